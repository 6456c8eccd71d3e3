"""Great-expectations suites over prepared manifests and their images."""

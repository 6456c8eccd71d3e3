"""The package's public names resolve to the objects their modules define."""

import cris_model


def test_every_public_name_resolves() -> None:
    for name in cris_model.__all__:
        assert getattr(cris_model, name) is not None, name
    assert cris_model.Predictor.__module__ == "cris_model.predict"
    assert cris_model.get_preset("cris_tiny").input_size == 128


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        cris_model.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")

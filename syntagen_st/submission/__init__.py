"""The competition entry: export, card, provenance, bundle, validate, reproduce."""

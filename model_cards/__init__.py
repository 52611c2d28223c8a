"""Model-card templates, shipped inside the package as `hf_mdm.model_cards` (see pyproject.toml) and rendered by
`hf_mdm.hub.write_model_card`."""

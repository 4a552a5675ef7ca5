"""FLUX.1: its own model kind (bundle, loaders, tiny test models, flow-matching objective), beside the SD families."""

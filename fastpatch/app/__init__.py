"""The demo app: built-in models (SmolLM2, the MiniLM claim classifier) and streams (geography,
claims), resolved by name through :mod:`fastpatch.app.registry`. The CLI uses it; the library
(editor, runner, formats, metrics, kernels) never imports it.
"""

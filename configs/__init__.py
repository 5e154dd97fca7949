"""The experiment configs, one `get_config(arg=None)` per file (see the README's config table).

Installed with lcjax as the package `lcjax.configs` (setup.cfg's package_dir), so
`lcjax.config.load_config("quickstart:tiny")` finds them in a checkout and in a wheel alike.
A config file never runs anything on import.
"""

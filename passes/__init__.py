"""snapopt's built-in passes.

Installed as ``snapopt.passes`` and registered through the ``snapopt.passes`` entry-point group, exactly as a
third-party plugin registers its own — so each module here doubles as a template for a user's pass.
"""

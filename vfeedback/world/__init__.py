"""The shapes world: procedural captioned scenes, learned judges and the ``tiny:shapes`` model.

See docs/world.md. ``scenes`` draws and captions scenes; ``judge`` trains and evaluates the
CNN judges behind the ``shapes_*`` rewards; ``train_world`` builds everything (``make world``).
"""

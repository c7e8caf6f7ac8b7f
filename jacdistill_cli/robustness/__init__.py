"""Robustness: adversarial attacks and noise made in pixel space, robust accuracy over a split, and the
adversarial objectives that train robust teachers. Reads models and data (zoo/, engine/); used by loop/ and
commands/."""

"""What the student learned to explain: explanation agreement of student and teacher (agreement.py: rank
correlation and top-10% overlap of their saliency maps, summed on the device batch by batch) and the
faithfulness of a network's own explanations (faithfulness.py: deletion and insertion curves in pixel space,
against random orders; saliency.py: the attributions; settings.py: the `explain` node; figure.py: the curves
as an image). Reads models and data (zoo/, engine/) and pixel space (robustness/); used by loop/ and commands/."""

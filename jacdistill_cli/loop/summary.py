"""What a single train run ends with on stdout: its results beside the teacher's, where the run is."""

from __future__ import annotations

from typing import Any


def summary_table(metrics: dict[str, Any], run_dir) -> str:
    """What a single run ends with on stdout: the student's test metrics beside the teacher's accuracy (and
    each attack's robust accuracy of both, with robustness=), then time, device and where the run is."""
    rows = [("test accuracy", f"{metrics['test_accuracy']:.4f}", f"{metrics['teacher_test_accuracy']:.4f}"),
            ("agreement with the teacher", f"{metrics['agreement']:.4f}", ""),
            ("input-gradient cosine", f"{metrics['jacobian_cosine']:.4f}", ""),
            ("saliency rank correlation", f"{metrics['explanation_rank_correlation']:.4f}", ""),
            ("saliency top-10% overlap", f"{metrics['explanation_top10_iou']:.4f}", ""),
            ("val accuracy", f"{metrics['val_accuracy']:.4f}", "")]
    teacher = metrics.get("teacher_robust_accuracy", {})
    rows += [(f"robust {key}", f"{value:.4f}", f"{teacher[key]:.4f}" if key in teacher else "")
             for key, value in metrics.get("robust_accuracy", {}).items() if key != "clean"]
    faith = metrics.get("faithfulness", {})
    if faith:
        rows += [(f"{label} area{' (random order)' if random else ''}",
                  *(f"{faith[net][('random_' if random else '') + key]:.4f}" for net in ("student", "teacher")))
                 for key, label in (("deletion_area", "deletion"), ("insertion_area", "insertion"))
                 for random in (False, True)]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':{width}}  student  teacher", *(f"{n:{width}}  {s:>7}  {t:>7}".rstrip() for n, s, t in rows),
             f"{metrics['epochs']} epoch{'s' if metrics['epochs'] != 1 else ''}, {metrics['steps']} steps in "
             f"{metrics['train_seconds']:.1f} s "
             f"({metrics['samples_per_second']:.0f} samples/s) on {metrics['device']}, seed {metrics['seed']}",
             *([f"robust accuracy on the first {metrics['robust_samples']} test samples (epsilon in pixel scale), "
                f"{metrics['robust_seconds']:.1f} s"] if "robust_samples" in metrics else []),
             f"run directory: {run_dir}"]
    return "\n".join(lines)

"""What `jacdistill check` prints: one row per method, then the lines below the table."""

from __future__ import annotations

from typing import Sequence

from jacdistill_cli.proofs.vanishing import Perturbation
from jacdistill_cli.proofs.verify import PRECISION_TOLERANCE, MethodReport

WITHOUT_EFFECT_WHY = ("finite differences are 0 there: input-gradients do not depend on a bias added after the last "
                      "nonlinearity, nor a ReLU network's on its biases but through BatchNorm statistics")


def format_report(reports: list[MethodReport], mistake: tuple[int, int],
                  perturbations: Sequence[Perturbation] = ()) -> str:
    """The table of `reports` and the lines below it; `mistake`: (parameters receiving a gradient, parameters)
    under the retain_graph mistake (verify.retain_graph_mistake); `perturbations`: what was added to networks
    whose input-gradients vanish (vanishing.proof_networks), a line each above the table."""
    precision = reports[0].precision if reports else "32"
    out = [p.line() for p in perturbations] + table(reports, precision)
    if precision != "32":
        out.append(f"error at {precision}: the input-gradients computed in float32 under autocast({precision}) "
                   f"against the float64 reference, relative l2; tolerance {PRECISION_TOLERANCE[precision]}")
    out.extend(without_effect_lines(reports))
    for r in reports:
        out.extend(r.notes())
    for r in reports:
        out.extend(f"{r.method}: FAILED: {failure}" for failure in r.failures)
    out.append(f"the common mistake, the student's gradient taken with retain_graph=True instead of "
               f"create_graph=True: {mistake[0]} of {mistake[1]} student parameters receive a gradient")
    return "\n".join(out)


def error_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def row(r: MethodReport, precision: str) -> tuple[str, ...]:
    """A method's row: its Jacobians' errors, the parameters it trains of those its term depends on, the
    finite-difference error, its error under `precision` (when not 32) and the result."""
    depends = len(r.dependent)
    untouched = len(r.parameters) - depends
    receiving = len([n for n in r.receiving if n in r.dependent])
    gradient = f"{receiving} of {depends}" + (f" (+{untouched} without effect)" if untouched else "")
    at_precision = [error_text(r.precision_error)] if precision != "32" else []
    return (r.method, f"{error_text(r.jacobian_error_student)} / {error_text(r.jacobian_error_teacher)}",
            gradient, f"{r.fd_error:.1e}", *at_precision, "ok" if r.passed else "FAILED")


def table(reports: list[MethodReport], precision: str) -> list[str]:
    """The header, a rule and one row per method, in aligned columns."""
    header = ("method", "jacobian error (student / teacher)", "parameters with gradient",
              "finite differences", *([f"error at {precision}"] if precision != "32" else []), "result")
    rows = [row(r, precision) for r in reports]
    widths = [max(len(str(cells[i])) for cells in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(str(v).ljust(w) for v, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def without_effect_lines(reports: list[MethodReport]) -> list[str]:
    """One line per set of parameters without effect on a term, naming the methods whose term it is."""
    methods_of: dict[tuple[str, ...], list[str]] = {}
    for r in reports:
        without = tuple(n for n in r.parameters if n not in r.dependent)
        if without:
            methods_of.setdefault(without, []).append(r.method)
    return [f"without effect on the term of {', '.join(names)}: {', '.join(without)} ({WITHOUT_EFFECT_WHY})"
            for without, names in methods_of.items()]

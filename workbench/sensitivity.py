"""`workbench sensitivity RECIPE --variant V [--target T]`: how much each node costs the model when
it alone is quantized, for a variant whose last step measures per-node sensitivity
(`Step.sensitivity_params`: the ONNX quantization step, int8 or weight-only); and, with a fidelity
target, the fewest most-sensitive nodes to keep in float. It builds the variant's parent through
the cache and runs that step in its sensitivity mode (export.sensitivity), in a folder of its own:
sensitivity.json, sensitivity.md and sensitivity.png, ready to paste into the recipe as
`keep_fp32: {top_k: N}` or `exclude_nodes: [...]`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from core import atomic
from core.errors import RecipeError
from workbench.run_dir import close_log, new_run_dir, open_log, say


def run_sensitivity(recipe, variant: str, target: Optional[float], out_root: Path, quick: bool = False) -> Path:
    from reporting.plots import sensitivity_bars
    from reporting.report import md_table
    from core.steps import STEPS, get_step
    from workbench.recipe import StepCall, VariantSpec
    from workbench.search import compress_with
    from workbench.sources.models import load_model
    from workbench.tasks import build_task
    from workbench.variants import VariantCache

    v = recipe.variants.get(variant)
    if v is None:
        raise RecipeError(f"--variant {variant!r} names no variant of {recipe.path}; accepted: {list(recipe.variants)}")
    last = v.steps[-1] if v.steps else None
    params = get_step(last.name).sensitivity_params(last.params, target) if last else None
    if params is None:
        offer = [n for n, c in STEPS.items() if c.offers_sensitivity()]
        raise RecipeError(f"--variant {variant!r}: its last step must be one that measures per-node sensitivity "
                          f"({', '.join(offer) or 'none is installed'} (int8 or weight-only)), which is what "
                          f"sensitivity quantizes node by node; it is {last.name if last else 'the source model'}")
    name = f"{variant}-sensitivity"
    probe = VariantSpec.model_validate({"from": v.from_, "steps": []})
    probe.steps = list(v.steps[:-1]) + [StepCall(name=last.name, params=params)]
    run_dir = new_run_dir(Path(out_root), f"{recipe.name}-sensitivity")
    handler = open_log(run_dir)
    try:
        say(f"sensitivity of {variant}: {run_dir}")
        src = load_model(recipe)
        task = build_task(recipe, src)
        records, _, _ = compress_with(recipe, {name: probe}, run_dir=run_dir, task=task, src=src, quick=quick,
                                      cache=VariantCache(Path(out_root) / recipe.name / "cache"))
        rec = next(r for r in records if r["name"] == name)
        if rec["status"] != "ok":
            raise RuntimeError(f"building {variant} with per-node sensitivity failed: {rec['error']}")
        sens = next(n["sensitivity"] for n in rec["notes"] if n.get("sensitivity"))
        atomic.write_json(run_dir / "sensitivity.json", {"variant": variant, **sens})
        plot = sensitivity_bars({"variants": [{**rec, "name": variant}]}, run_dir)
        sug = sens.get("suggestion")
        lines = [f"# Per-node sensitivity: `{variant}` ({recipe.path})", "",
                 f"Each node quantized alone, everything else float; metric: {sens['metric']}, on "
                 f"{sens['measured_on']}. Most sensitive first.", ""]
        if sug:
            lines += [f"For fidelity {sug['target']}: keep {len(sug['nodes'])} node(s) in float"
                      f"{'' if sug['met'] else ' (the target was not met with any tried)'}: "
                      f"`keep_fp32: {{top_k: {len(sug['nodes'])}}}` or `exclude_nodes: {sug['nodes']}`. "
                      f"Fidelity by how many are kept: {sug['fidelity_by_kept']}.", ""]
        lines += [md_table(["#", "node", "op", "cosine when quantized alone"],
                           [[str(i + 1), r["node"], r["op_type"], f"{r['fidelity']:.6f}"]
                            for i, r in enumerate(sens["ranking"])]), "", f"![sensitivity]({plot.name})", ""]
        atomic.write_text(run_dir / "sensitivity.md", "\n".join(lines))
        return run_dir
    finally:
        close_log(handler)

"""Run a registered analysis on a training run; writes RUN/analysis/<name>.json and RUN/plots/<name>.png.

    python -m experiments.analyze --config=configs/analyze/hessian.py --workdir=runs/demo \
        [--config.loss.kind=clean --config.hessian.top_k=20 --config.name=hessian_clean]

``config.analysis`` names the analysis (``jaxrobust.analysis.list_analyses()``: hessian, density,
landscape, similarity, grad_norm, connectivity, ... and what ``--config.imports=my_pkg`` registers);
``config.name`` the outputs ("" = the analysis's name), so several analyses of one run coexist. As a
``reproduce`` step: entry ``analyze``, output ``analysis/<name>.json``.
"""
import os
import re
import time

from experiments import (define_entrypoint_flags, import_run_modules, make_main, run,
                         write_json_atomic)

define_entrypoint_flags("Analysis config file (configs/analyze/<x>.py[:smoke]).",
                        "Work directory of a training run (outputs go to RUN/analysis, RUN/plots).")


def output_name(config) -> str:
    name = config.name or config.analysis
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"config.name={name!r}: use letters, digits, '_', '-' or '.' (it names "
                         f"RUN/analysis/<name>.json).")
    return name


def analyze(config, workdir):
    import jaxrobust.analysis as ja
    analysis = ja.get_analysis(config.analysis)
    name = output_name(config)
    ja.validate_common(config)
    if analysis.validate is not None:
        analysis.validate(config)
    if analysis.needs_run:
        if not os.path.exists(os.path.join(workdir, "config.json")):
            raise FileNotFoundError(f"{workdir} is not a training run's workdir (no config.json); "
                                    f"train it first with python -m experiments.train.")
        import_run_modules(workdir)
    ctx = ja.AnalysisContext(config, workdir)
    t0 = time.time()
    result = ja.to_jsonable(analysis.run(ctx))
    meta = {"analysis": config.analysis, "name": name, "seconds": time.time() - t0,
            "settings": ja.settings_of(config)}
    if analysis.needs_run:
        meta["step"] = ctx.run.step
    result = {**meta, **result}
    os.makedirs(os.path.join(workdir, "analysis"), exist_ok=True)
    if config.plot and analysis.plot is not None:
        path = analysis.plot(result, os.path.join(workdir, "plots", f"{name}.png"), config)
        if path:
            result["plot"] = os.path.relpath(path, workdir)
    write_json_atomic(result, os.path.join(workdir, "analysis", f"{name}.json"))
    return {"result": result, "summary": analysis.summary}


def summarise(out):
    result, summary = out["result"], out["summary"]
    if summary is not None:
        return {"name": result["name"], **summary(result)}
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "settings"}


main = make_main(analyze, summarise, resume_note="re-run the same command")


if __name__ == "__main__":
    run(main)

"""How each command shows its result: aligned text, or one JSON object with ``--json``.

A printer gets the API function's result and the arguments the command was called with; it prints and
returns nothing, or raises a DeepnetError for an exit status other than 0 (a failed check, a target
not reached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from deepnet.activations.check import ActivationCheckError, failure_message, format_report
from deepnet.errors import DeepnetError
from deepnet.formats.hdf5 import ModelFile
from deepnet.report import Table, format_rate, format_seconds, jsonable, print_fields, print_json, run_fields
from deepnet.tools.check import CheckReport
from deepnet.tools.info import format_info
from deepnet.training.speedrun import TargetNotReached

#: What a printer gets: the API function's result and the arguments it was called with.
Printer = Callable[[Any, dict], None]




def show_init(result: ModelFile, args: dict) -> None:
    extra = f", with an MLP branch of {args['hidden']} hidden units" if args["branch"] else ""
    print(f"created {args['model']}: {args['layers']} layers x width {args['width']}, {args['activation']}{extra}")


def _final_fields(final: dict, model: str) -> dict:
    """The lines a training run's text summary starts with."""
    return {
        "model": model,
        "steps": f"{final['steps']} (now at step {final['step']})",
        "loss": f"{final['loss']:.4f} (mean of the last report window)",
        "batch_acc": f"{final['batch_acc']:.3f}",
        "time": f"{format_seconds(final['seconds'])} ({final['seconds_per_step']:.4f} s/step)",
    }


def _test_field(final: dict) -> dict:
    """The test evaluation's line, if the run made one."""
    if "test_acc" not in final:
        return {}
    return {"test": f"loss {final['test_loss']:.4f}, accuracy {final['test_acc']:.4f} on {final['test_samples']} images"}


def show_train(final: dict, args: dict) -> None:
    if final.get("rank", 0) != 0:  # under mpiexec, rank 0 prints the run's result
        return
    if args["json"]:
        print_json(final)
        return
    if final.get("mode") == "mach":
        _show_mach(final)
        return
    fields = _final_fields(final, final["model"])
    fields["layer-samples/s"] = format_rate(final["layer_samples_per_s"])
    fields.update(_test_field(final))
    fields.update(run_fields(final))
    if "per_rank" in final:
        fields["ranks"] = f"{final['ranks']}, {final['micro_batches']} micro-batches a step"
        for r in final["per_rank"]:
            fields[f"rank {r['rank']}"] = (f"{r['layers']:,} layers; waited {r['waited_per_step']:.4f} s and sent "
                                           f"{r['sent_bytes_per_step']:,.0f} bytes a step")
    print_fields(fields)


def _show_mach(final: dict) -> None:
    """A Mach run: the run's lines, then one line per section."""
    s = final["settings"]
    fields = {
        "model": final["model"],
        "steps": f"{final['steps']} per section (now at step {final['step']})",
        "time": f"{format_seconds(final['seconds'])} ({final['steps_per_s_summed']:.2f} steps/s summed over "
                f"{final['sections']} sections)",
        "settings": (f"inputs {s['inputs']}, local weight {s['local_weight']:g}, delayed weight "
                     f"{s['delayed_weight']:g}, max delay {s['max_delay']}, distilled hidden {s['distill_hidden']}"),
    }
    fields.update(_test_field(final))
    for p in final["per_section"]:
        test = f"; test {p['test_acc']:.4f}" if "test_acc" in p else ""
        synthetic = f", synthetic {p['synthetic_test_acc']:.4f}" if "synthetic_test_acc" in p else ""
        fields[f"section {p['section']}"] = (
            f"{p['layers']:,} layers, {p['steps_per_s']:.2f} steps/s, blocked {p['blocked_seconds']:.3f} s; "
            f"inputs {p['real_inputs']} real / {p['synthetic_inputs']} synthetic; late gradients "
            f"{p['late_applied']} applied, {p['dropped']} dropped, {p['unanswered']} unanswered{test}{synthetic}")
    print_fields(fields)


def show_eval(figures: dict, args: dict) -> None:
    if args["json"]:
        print_json(figures)
        return
    correct = int(round(figures["accuracy"] * figures["samples"]))
    model = figures["model"] + (f" (mlp, hidden {figures['hidden']})" if "hidden" in figures else "")
    if "section" in figures:
        what = "its distilled input alone" if figures["synthetic"] else f"sections 0..{figures['section']}"
        model += (f" (section {figures['section']} of {figures['sections']}: its head on {what}, "
                  f"{figures['layers']:,} layers)")
    fields = {
        "model": model,
        "step": figures["step"],
        "loss": f"{figures['loss']:.4f}",
        "accuracy": f"{figures['accuracy']:.4f} ({correct}/{figures['samples']})",
        "time": f"{format_seconds(figures['seconds'])} ({figures['samples_per_s']:.1f} images/s)",
    }
    if figures.get("ema"):
        fields["weights"] = f"the average (EMA {figures['ema_decay']:g}) taken at step {figures['ema_step']}"
    print_fields(fields)


def show_speedrun(report: dict, args: dict) -> None:
    if args["json"]:
        print_json(report)
    else:
        r = report["recipe"]
        if report["reached"]:
            seconds = report["time_to_target"]
            exact = f" ({seconds:.1f} s)" if seconds >= 60 else ""  # under a minute, format_seconds is exact
            headline = (f"{format_seconds(seconds)}{exact} to held-out "
                        f"accuracy {report['heldout_acc']:.4f} >= {report['target_acc']:g}, at step {report['steps']}")
        else:
            best = "no held-out evaluation passed the gate" if report["best_heldout_acc"] is None else \
                f"best held-out accuracy {report['best_heldout_acc']:.4f} at step {report['best_heldout_step']}"
            headline = (f"target {report['target_acc']:g} NOT reached in {report['steps']} steps "
                        f"({format_seconds(report['seconds'])}; {best})")
        print_fields({
            "time to target": headline,
            "test": (f"accuracy {report['test_acc']:.4f}, loss {report['test_loss']:.4f} on "
                     f"{report['test_samples']} images"),
            "time": (f"{format_seconds(report['seconds'])}: steps {format_seconds(report['train_seconds'])} "
                     f"({report['seconds_per_step']:.4f} s/step), {report['evaluations']} held-out evaluations "
                     f"{format_seconds(report['eval_seconds'])}"),
            "workload": (f"{r['layers']:,} layers x width {r['width']}, {r['activation']}, batch {r['batch']}, "
                         f"lr {r['layer_lr']:g}/{r['head_lr']:g} {r['schedule']}, {report['mode']}, "
                         f"held-out {r['holdout']} images every {r['eval_every']} steps"),
            "machine": report["machine"],
            **({"model": report["model"]} if report["model"] else {}),
        })
    if not report["reached"]:
        raise TargetNotReached(f"the target held-out accuracy {report['target_acc']:g} was not reached in "
                               f"{report['steps']} steps")


def show_info(summary: dict, args: dict) -> None:
    if args["json"]:
        print_json(jsonable(summary))
    else:
        print(format_info(summary))


class CheckFailed(DeepnetError):
    """`deepnet check` found a torn or damaged file (exit status 1)."""

    exit_status = 1


def show_check(report: CheckReport, args: dict) -> None:
    if args["json"]:
        print_json(report.as_dict())
    else:
        print(report.text())
    if not report.healthy:
        raise CheckFailed(f"{args['model']}: {report.summary}")


def show_bench(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    fields = {
        "workload": (f"{args['layers']:,} layers x width {args['width']}, {args['activation']}, batch "
                     f"{args['batch']}, {result['mode']}"),
        "s/step": (f"{result['seconds_per_step']:.4f} median of {args['steps']} "
                   f"(min {result['seconds_per_step_min']:.4f})"),
        "warm-up": f"{len(result['warmup_times'])} steps, "
                   + " ".join(f"{seconds:.3f}" for seconds in result["warmup_times"]) + " s",
        "threads": "forward/backward per step: " + " ".join(f"{fwd}/{bwd}" for fwd, bwd in result["step_threads"]),
        "backward block": "samples (and split, on two threads or more) per step: " + " ".join(
            str(block) if threads[1] == 1 else f"{block}/{split}" for block, split, threads
            in zip(result["step_backward_blocks"], result["step_backward_splits"], result["step_threads"])),
        "layer-samples/s": format_rate(result["layer_samples_per_s"]),
        "kernels": result["kernels"],
        "peak memory": f"{result['peak_rss_bytes'] / 2**30:.2f} GiB",
    }
    stolen = result["cpu_stolen_fraction"]
    fields["cpu stolen"] = ("not measured (no steal count from the kernel, or timed steps too short to count)"
                            if stolen is None else f"{100 * stolen:.1f}% of the machine's CPU time during the "
                            "timed steps (run by the hypervisor for others)")
    probe = result["vcpu_probe_ns_per_layer"]
    fields["vCPU probe"] = ("not measured (one CPU, or threads cannot be bound to CPUs here)" if probe is None
                            else "ns a layer of a one-thread backward on each CPU: before the timed steps "
                            + " / ".join(f"{ns:.2f}" for ns in probe["before"].values()) + ", after "
                            + " / ".join(f"{ns:.2f}" for ns in probe["after"].values())
                            + " (a slow CPU slows every pass that shares it)")
    if args["eval_samples"]:
        fields["eval"] = f"{result['eval_images_per_s']:.1f} images/s over {args['eval_samples']} images"
    print_fields(fields)


def show_train_mlp(final: dict, args: dict) -> None:
    if args["json"]:
        print_json(final)
        return
    print_fields({**_final_fields(final, f"{final['model']} (mlp, hidden {final['hidden']})"), **_test_field(final)})


def show_import_raw(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    shape = (f"{result['layers']:,} layers x width {result['width']}, {result['activation']}, "
             f"alpha {result['alpha']:g}" if result["kind"] == "dense" else f"mlp, hidden {result['hidden']}")
    print(f"imported {args['model']}: {shape} ({result['bytes']:,} bytes in {result['seconds']:.2f}s)")


def show_export_raw(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    files = " and ".join(p for p in (result.get("weights"), result["head"]) if p)
    print(f"exported {args['model']} ({result['kind']}) to {files}: "
          f"{result['bytes']:,} bytes in {result['seconds']:.2f}s")


def show_shard(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    print(f"sharded {result['model']} (step {result['step']:,}, {result['layers']:,} layers) into {result['root']} "
          f"and {result['ranks']} shards: {result['bytes']:,} bytes in {result['seconds']:.2f}s")
    for s in result["shards"]:
        print(f"  shard {s['index']}: layers {s['first_layer']:,}..{s['first_layer'] + s['layers'] - 1:,}  {s['file']}")


def show_gather(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    print(f"gathered {result['root']} ({result['ranks']} shards, step {result['step']:,}, {result['layers']:,} layers) "
          f"into {result['model']}: {result['bytes']:,} bytes in {result['seconds']:.2f}s")


def show_diagnose(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    teacher = result.get("teacher")
    print_fields({"model": f"{result['model']}: {result['layers']:,} layers x width {result['width']}, "
                           f"{result['activation']}, step {result['step']}",
                  "probe": f"the first {result['probe_samples']} test samples of {result['probe']}: "
                           f"{result['loss_kind']} loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}",
                  **({"teacher": f"{teacher['path']}: {teacher['layers']:,} layers x width {teacher['width']}, "
                                 f"{teacher['activation']}"} if teacher else {}),
                  "time": format_seconds(result["seconds"]),
                  **({"plot": result["plot"]} if "plot" in result else {})})
    columns = [("layers", 23), ("||h||", 10), ("||update||", 10), ("band adds", 10), ("||grad||", 10),
               ("||W||", 10), ("||W-W0||", 10)]
    keys = ["h_norm", "update_norm", "band_change", "grad_norm", "weight_norm", "weight_change"]
    if teacher:
        columns += [("teacher layer", 13), ("corr", 7), ("corr min", 8), ("|w| matched", 11), ("|w| other", 10)]
        keys += ["corr_mean", "corr_min", "row_norm_matched", "row_norm_unmatched"]
    table = Table(columns)
    for band in result["bands"]:
        first, n = band["first_layer"], band["layers"]
        cells = [f"{first:,}..{first + n - 1:,}"]
        for key in keys:
            value = band[key]
            if key == "corr_mean":
                cells.append(f"{band['teacher_layer']:,}")
            cells.append("-" if value is None else f"{value:.3f}" if key.startswith("corr") else f"{value:.4g}")
        table.row(*cells)


def show_plot(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
    else:
        print(f"wrote {result['out']}: {result['rows']:,} log rows, moving average of {result['smooth']}")


def show_data(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    print(f"MNIST is in {result['data_dir']}")
    if "coarse_file" in result:
        ks = ", ".join(f"{k}x{k}" for k in result["coarse_ks"])
        print(f"coarse cells ({ks}) are in {result['coarse_file']} ({result['coarse_bytes'] / 1e6:.1f} MB, "
              f"sha256 {result['coarse_sha256'][:16]}...)")


def show_luckmatters(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    settings = result["settings"]
    print_fields({"experiment": f"{result['experiment']}: teacher {settings['data_d']}-"
                                f"{'-'.join(map(str, settings['ks']))}-{settings['d_output']}, student widths "
                                f"{'-'.join(map(str, settings['student_widths']))}, lr {settings['lr']:g}, "
                                f"{result['iterations_done']:,} steps" + (" (diverged)" if result["diverged"] else ""),
                  "time": format_seconds(result["seconds"])})
    table = Table([("layer", 5), ("teacher units", 13), ("student units", 13), ("best corr", 9), ("min", 6),
                   ("W_row_norm matched", 18), ("unmatched", 9), ("unmatched max", 13)])
    for layer in result["final"]:
        norms = layer["w_row_norm"]

        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.3g}"

        table.row(layer["layer"], layer["teacher_units"], layer["student_units"], f"{layer['mean_best_corr']:.4f}",
                  f"{layer['min_best_corr']:.3f}", fmt(norms["matched"]["mean"]), fmt(norms["unmatched"]["mean"]),
                  fmt(norms["unmatched"]["max"]))


def show_teacher(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    print(f"wrote the teacher {result['teacher']}: {result['layers']:,} layers x width {result['width']}, "
          f"{result['activation']}, {result['input_dim']} inputs of std {result['data_std']:g} -> "
          f"{result['outputs']} outputs (init scale {result['init_scale']:g}, seed {result['seed']})")


def show_activations(result: dict, args: dict) -> None:
    for row in result["activations"]:
        if args["json"]:
            print_json(row)
        else:
            print(f"{row['name']:<16} {row['origin']:<28} {row['compiled']:<9} {row['description']}")
    # result["problems"] reached stderr already, one line each, as the plugins' warnings (main()).


def show_activation_check(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
    else:
        print(format_report(result))
    if not result["ok"]:
        raise ActivationCheckError(failure_message(result))


def show_compiled(rows: list[dict], args: dict) -> None:
    for row in rows:
        if args["json"]:
            print_json(row)
        else:
            print(f"{row['name']}: {row['module']} ({row['path'] if row['path'] is not None else 'built in'})")



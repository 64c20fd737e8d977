"""The `fedsilo` command. Each subcommand builds its settings once and hands them down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Federated PEFT fine-tuning across silos.", no_args_is_help=True, add_completion=False)


@app.command()
def run(
    job_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="FederatedJob YAML."),
    out: Path = typer.Option(Path("runs"), help="Runs folder; each run goes to <out>/<job>/<UTC start>/ "
                             "and <out>/<job>/latest points at it."),
    port: int = typer.Option(0, help="Aggregator port on 127.0.0.1 (0: any free port)."),
    backoff_limit: int = typer.Option(
        6, min=0, help="Restarts allowed per process that dies (exponential backoff, 1 s doubling to 30 s)."
    ),
) -> None:
    """Run a FederatedJob on this machine: an aggregator and one process per silo."""
    from fedsilo.local.runner import run_local
    from fedsilo.spec import SpecError, load_job

    try:
        job = load_job(job_file)
    except SpecError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_local(job, job_file.resolve().parent, out, port, backoff_limit))


@app.command()
def aggregator() -> None:
    """Serve the aggregator (settings from FEDSILO_* environment variables)."""
    from fedsilo.aggregator.server import serve
    from fedsilo.aggregator.settings import AggregatorSettings

    serve(AggregatorSettings())  # type: ignore[call-arg]


@app.command("silo-agent")
def silo_agent() -> None:
    """Run one silo's agent (settings from FEDSILO_* environment variables)."""
    from fedsilo.silo_agent.settings import SiloSettings

    settings = SiloSettings()  # type: ignore[call-arg]
    from fedsilo.silo_agent.quiet import setup_logging

    setup_logging(settings.silo)  # before the model loads: its progress bars and load report go through it
    from fedsilo.silo_agent.agent import run_agent

    raise typer.Exit(run_agent(settings))


@app.command()
def validate(job_file: Path = typer.Argument(..., exists=True, dir_okay=False)) -> None:
    """Check a FederatedJob and what it names on this machine (data files, labels, base model); list every problem."""
    from fedsilo.local.validate import validate as check

    report = check(job_file)
    if report.job is not None and report.ok:
        spec = report.job.spec
        typer.echo(f"{report.job.metadata.name}: valid ({len(spec.silos)} silos, {spec.training.rounds} rounds)")
    else:
        typer.secho(f"{job_file}: {len(report.problems)} problem(s)", fg="red", err=True)
        for problem in report.problems:
            typer.secho(f"  x {problem}", fg="red", err=True)
    for line in report.checked:
        typer.echo(f"  ok {line}")
    if report.unchecked:
        typer.echo("not checked here (read inside the silos):")
        for line in report.unchecked:
            typer.echo(f"  - {line}")
    if not report.ok:
        raise typer.Exit(2)


@app.command()
def teacher(
    job_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="FederatedJob YAML (labels, maxLength)."),
    public: Path = typer.Option(..., exists=True, dir_okay=False, help="Public training data (CSV, JSONL, Parquet)."),
    base: str = typer.Option(..., help="Teacher base model folder, e.g. all-mpnet-base-v2 (any architecture)."),
    out: Path | None = typer.Option(None, help="Output folder (default: the spec's distillation.teacher.path)."),
    steps: int = typer.Option(300, min=1, help="Optimizer steps of full fine-tuning."),
    batch_size: int = typer.Option(16, min=1),
    learning_rate: float = typer.Option(3e-5, min=0),
    text_field: str = typer.Option("text", help="Text column of the public file."),
    label_field: str = typer.Option("label", help="Label column of the public file (names of task.labels)."),
) -> None:
    """Fine-tune a FedKDLoRA teacher on public data, for the job's labels; save it where the spec points."""
    from fedsilo.silo_agent.data import read_table
    from fedsilo.silo_agent.teacher import fit_teacher
    from fedsilo.spec import DataSpec, load_job

    spec = load_job(job_file).spec
    folder = out or (Path(spec.distillation.teacher.path) if spec.distillation else None)
    if folder is None:
        raise typer.BadParameter("the job has no distillation.teacher.path: pass --out", param_hint="--out")
    if not folder.is_absolute() and out is None:
        folder = job_file.parent / folder  # spec paths are relative to the job file
    data = DataSpec(path=str(public.resolve()), text_field=text_field, label_field=label_field)
    frame = read_table(data, public.parent)
    max_length = (spec.distillation.teacher.max_length if spec.distillation else None) or spec.training.max_length
    report = fit_teacher(base, frame, data, spec.task.labels, folder, steps=steps, batch_size=batch_size,
                         learning_rate=learning_rate, max_length=max_length, seed=spec.training.seed)
    accuracy = f"{report.held_out_accuracy:.3f}" if report.held_out_accuracy is not None else "n/a"
    typer.echo(f"teacher saved to {folder}: {report.steps} steps on {report.public_examples} public examples "
               f"in {report.seconds:.0f}s; held-out accuracy {accuracy} on {report.held_out_examples}")


@app.command("operator")
def operator_() -> None:
    """Run the Kubernetes operator (settings from FEDSILO_* environment variables)."""
    from fedsilo.operator import OperatorSettings, run_operator

    run_operator(OperatorSettings())


@app.command()
def crds(
    check: bool = typer.Option(False, "--check", help="Only check; exit 1 when the file is stale."),
    path: Path | None = typer.Option(None, help="Output file (default: crds/federatedjob.yaml)."),
) -> None:
    """Generate crds/federatedjob.yaml from the spec models (or check it is current)."""
    from fedsilo.operator.crd import default_crd_path, write_crd

    target = path or default_crd_path()
    current = write_crd(target, check=check)
    if check and not current:
        typer.secho(f"{target} is stale: run `fedsilo crds`", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"{target}: {'current' if current else 'written'}")


@app.command()
def export(
    source: Path = typer.Argument(..., exists=True, file_okay=False,
                                  help="runs/<job> (its latest run), a run folder, or an adapter folder."),
    out: Path = typer.Option(..., help="Folder for the merged model and tokenizer."),
    base: str | None = typer.Option(None, help="Base model folder (default: from the adapter's fedsilo.json/config)."),
    dtype: str = typer.Option("fp32", help="Saved weight type: fp32, bf16 or fp16."),
) -> None:
    """Merge a job's final PEFT adapter into its base model and save a plain model folder."""
    from fedsilo.local.export import ExportError
    from fedsilo.local.export import export as export_model

    try:
        folder = export_model(source, out, base, dtype)
    except ExportError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"merged model written to {folder}")


URL = typer.Option(None, "--url", envvar="FEDSILO_URL", help="Aggregator URL, e.g. https://127.0.0.1:8080 "
                   "(kubectl -n NS port-forward svc/JOB-aggregator 8080:http).")
TOKEN = typer.Option(None, "--token", envvar="FEDSILO_ADMIN_TOKEN", show_default=False,
                     help="The job's admin token (better: the FEDSILO_ADMIN_TOKEN variable or --token-file).")
TOKEN_FILE = typer.Option(None, "--token-file", exists=True, dir_okay=False, help="File holding the admin token.")
CA_BUNDLE = typer.Option(None, "--ca-bundle", exists=True, dir_okay=False, help="CA bundle for an HTTPS aggregator.")
SERVER_NAME = typer.Option(None, "--server-name", help="Name the aggregator's certificate must carry when --url "
                           "names another host, e.g. demo-aggregator.fl.svc through a port-forward to 127.0.0.1.")


def _target(
    job: str, url: str | None, token: str | None, token_file: Path | None, ca_bundle: Path | None,
    server_name: str | None,
) -> Any:
    from fedsilo.local.remote import Target

    if not url:
        typer.secho("--url (or FEDSILO_URL) is required to reach an aggregator", fg="red", err=True)
        raise typer.Exit(2)
    secret = token_file.read_text().strip() if token_file else token
    if not secret:
        typer.secho("the job's admin token is required: --token-file, FEDSILO_ADMIN_TOKEN or --token", fg="red",
                    err=True)
        raise typer.Exit(2)
    return Target(url, job, secret, ca_bundle, server_name)


@app.command()
def status(
    target: str = typer.Argument(..., help="A job name (with --url), or a local run folder: runs/<job>."),
    url: str | None = URL,
    token: str | None = TOKEN,
    token_file: Path | None = TOKEN_FILE,
    ca_bundle: Path | None = CA_BUNDLE,
    server_name: str | None = SERVER_NAME,
    as_json: bool = typer.Option(False, "--json", help="Print status, rounds and evaluations as JSON."),
) -> None:
    """Where a job stands: phase, the round running, scores, privacy, silos and the round table."""
    from rich.console import Console

    from fedsilo.local import remote, runs

    console = Console()
    folder = Path(target)
    if url is None and folder.is_dir():
        try:
            run_dir = runs.resolve(folder)
        except runs.RunsError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        live = remote.local_target(run_dir)
        if live is None:
            if as_json:
                typer.echo(json.dumps({"run": runs.RunRecord.load(run_dir).__dict__,
                                       "rounds": remote.saved_rows(run_dir)}, indent=2))
            else:
                console.print(remote.render_saved(run_dir))
            return
        where = live
    else:
        where = _target(target, url, token, token_file, ca_bundle, server_name)
    try:
        snap = remote.snapshot(where)
    except remote.RemoteError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"status": snap.status.model_dump(mode="json"),
                               "rounds": [r.model_dump(mode="json") for r in snap.history],
                               "evaluations": snap.evaluations}, indent=2))
        return
    has_evaluator = any(s.role == "evaluator" for s in snap.status.silos)
    console.print(remote.render(snap, has_evaluator))


@app.command()
def pull(
    job: str = typer.Argument(..., help="Job name on the aggregator."),
    url: str | None = URL,
    token: str | None = TOKEN,
    token_file: Path | None = TOKEN_FILE,
    ca_bundle: Path | None = CA_BUNDLE,
    server_name: str | None = SERVER_NAME,
    version: int | None = typer.Option(None, min=0, help="Global adapter version (default: the newest)."),
    out: Path = typer.Option(Path("runs"), help="Runs folder; the pull goes to <out>/<job>/<UTC time>/."),
) -> None:
    """Fetch a job's global adapter (with its model card), rounds and plot from a running aggregator."""
    from fedsilo.local import remote

    try:
        results = remote.pull(_target(job, url, token, token_file, ca_bundle, server_name), out, version)
    except remote.RemoteError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    status = results.status
    phase = f"{status.phase}, round {status.round}/{status.rounds}" if status else "?"
    typer.echo(f"{job}: global adapter version {results.version} ({phase}) -> {results.adapter_dir}")
    typer.echo(f"  model card {results.adapter_dir / 'README.md'}   rounds {results.run_dir / 'rounds.csv'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

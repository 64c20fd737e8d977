"""The `fedsilo` command. Each subcommand builds its settings once and hands them down."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Federated PEFT fine-tuning across silos.", no_args_is_help=True, add_completion=False)


@app.command()
def run(
    job_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="FederatedJob YAML."),
    out: Path = typer.Option(Path("runs"), help="Runs folder; results go to <out>/<job name>/."),
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

    setup_logging(settings.silo)  # before the agent imports torch and transformers
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
    source: Path = typer.Argument(..., exists=True, file_okay=False, help="Run folder (runs/<job>) or adapter folder."),
    out: Path = typer.Option(..., help="Folder for the merged model and tokenizer."),
    base: str | None = typer.Option(None, help="Base model folder (default: the one named in the adapter config)."),
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`prepare_data` as an Apache Beam pipeline: the stages of `prepare_stages`, mapped over collections.

    python -m biomedlm_jax.prepare_data --input=... --tokenizer=... --out=... \
        --runner=DirectRunner --direct_num_workers=2          # this machine, two worker processes
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://...   # a cluster

Any option Beam knows (`--runner`, `--direct_num_workers`, `--direct_running_mode`, Dataflow's,
Flink's, Spark's) is passed through. With the DirectRunner and more than one worker the default
running mode is `multi_processing` (separate processes, not threads that share one GIL).

The graph:

    Impulse ─> unit numbers ─Reshuffle─> tokenize_unit (writes WORK/units/*; skipped when already there)
      └─> record_events ─GroupByKey(id)─> resolve ─┬──────────────────────────────────────────────┐
                                                    └─> text_events ─GroupByKey(text hash)─> later_copies ─┤
      └──────────────(unit, None)──────────────────────────────────────────────────────CoGroupByKey(unit)─> plan_unit
            plans ─ToList─> layout (a singleton side input)
            layout ─> shard tasks ─Reshuffle─> write_shard(layout)

The unit numbers are made at run time from a count, and the job holds the path of the input list
in WORK, not the list, so the graph is the same size for ten inputs or ten million. The launcher then
runs `prepare_stages.finish` (the doc-id index and the manifest), as the local run does. Workers read
the inputs, the tokenizer and WORK by path or URL: on a cluster these must be URLs (gs://...) that
every worker reaches, which `prepare.check_runner` enforces before the job starts.
"""
from __future__ import annotations

from typing import Sequence

from biomedlm_jax.data import prepare_stages as stages


def _tokenize(u: int, job: stages.Job):
    import apache_beam as beam

    if stages.tokenize_unit(job, u):
        beam.metrics.Metrics.counter("prepare", "units_tokenized").inc()
    return u


def _plan(kv, job: stages.Job) -> dict:
    u, grouped = kv
    return stages.plan_unit(job, u, grouped["winners"], grouped["duplicates"])


def pipeline_options(beam_args: Sequence[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    names = {a.split("=", 1)[0] for a in args}
    workers = [a.split("=", 1)[1] for a in args if a.startswith("--direct_num_workers=")]
    if workers and int(workers[-1]) > 1 and not names & {"--direct_running_mode", "--environment_type"}:
        args.append("--direct_running_mode=multi_processing")
    return PipelineOptions(args)


def run(job: stages.Job, beam_args: Sequence[str]) -> tuple[dict, int]:
    """Runs the stages of `job` on Beam; returns (layout, work units tokenized by this run)."""
    try:
        import apache_beam as beam
    except ImportError as e:
        raise ImportError("--runner needs Apache Beam: pip install -e .[beam]") from e
    from apache_beam.metrics.metric import MetricsFilter

    p = beam.Pipeline(options=pipeline_options(beam_args))
    units = (p | "start" >> beam.Impulse() | "units" >> beam.FlatMap(lambda _: range(job.units))
             | "spread units" >> beam.Reshuffle() | "tokenize" >> beam.Map(_tokenize, job))
    winners = (units | "records" >> beam.FlatMap(lambda u: stages.record_events(job, u))
               | "by id" >> beam.GroupByKey() | "resolve" >> beam.MapTuple(stages.resolve))
    duplicates = (winners | "texts" >> beam.FlatMapTuple(stages.text_events) | "by text" >> beam.GroupByKey()
                  | "later copies" >> beam.FlatMapTuple(stages.later_copies))
    plans = ({"units": units | "key" >> beam.Map(lambda u: (u, None)), "winners": winners,
              "duplicates": duplicates}
             | "by unit" >> beam.CoGroupByKey() | "plan" >> beam.Map(_plan, job))
    lay = plans | "all plans" >> beam.combiners.ToList() | "layout" >> beam.Map(lambda ps: stages.layout(job, ps))
    side = beam.pvalue.AsSingleton(lay)
    (lay | "shard tasks" >> beam.FlatMap(stages.shard_tasks) | "spread shards" >> beam.Reshuffle()
     | "write shards" >> beam.Map(lambda t, layout: stages.write_shard(job, t, layout), side))
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("units_tokenized"))["counters"]
    tokenized = sum(c.committed or c.attempted or 0 for c in counters)
    # The layout is a pure function of the plans, so the launcher recomputes it from them rather than
    # fetching it from the workers.
    return stages.layout(job, [stages.plan_summary(job, u) for u in range(job.units)]), tokenized

"""The scorer as a Ray Serve application: the deployment graph of a profile and the ways to run it.

`build_app` is Serve's import path (`bahe_ray.serve:build_app`, as in serve_configs/*.yaml and
k8s/rayservice-scorer.yaml); `running_scorer` runs it for the length of a block (the demo,
`bahe bench`); `serve_blocking` runs it until Ctrl-C (`bahe serve`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from bahe_ray.config import Config, ServeConfig, load_config
from bahe_ray.serve.http import Ingress
from bahe_ray.serve.scorer import AtomEncoder, HttpScorer, Scorer, ScorerConfig

APP_NAME = "scorer"


def scorer_options(sc: ServeConfig) -> dict[str, Any]:
    """The Scorer's Serve options from the profile: replicas or autoscaling bounds, request limits, CPU/GPU share."""
    options: dict[str, Any] = {
        "max_ongoing_requests": sc.max_ongoing_requests,
        "max_queued_requests": sc.max_queued_requests,
        "ray_actor_options": {"num_cpus": sc.scorer_cpus, "num_gpus": sc.scorer_gpus if sc.use_gpu else 0},
        "user_config": ScorerConfig(checkpoint=sc.checkpoint).model_dump(),
    }
    if sc.autoscaling is None:
        options["num_replicas"] = sc.replicas
    else:
        options["autoscaling_config"] = sc.autoscaling.model_dump()
    return options


def scorer_app(cfg: Config) -> Application:
    """Ingress -> Scorer -> AtomEncoder for a profile, or Scorer (serving HTTP) -> AtomEncoder with
    `serve.ingress: scorer`.

    The Scorer's user_config starts as {"checkpoint": cfg.serve.checkpoint}; a serve config
    that sets it (deployments: - name: Scorer, user_config: ...) rolls another one out. A serve
    config's deployment options override those of the profile.
    """
    gpus = cfg.serve.encoder_gpus if cfg.serve.use_gpu else 0
    encoder = AtomEncoder.options(ray_actor_options={"num_cpus": 0.5, "num_gpus": gpus}).bind(cfg)
    if cfg.serve.ingress == "scorer":
        return HttpScorer.options(**scorer_options(cfg.serve)).bind(cfg, encoder)
    scorer = Scorer.options(**scorer_options(cfg.serve)).bind(cfg, encoder)
    return Ingress.options(num_replicas=cfg.serve.ingress_replicas).bind(scorer, cfg.serve)


class AppArgs(BaseModel):
    """`args` of the Serve config files: the run profile and optional `section.key=value` overrides."""

    model_config = ConfigDict(extra="forbid")

    config: str
    overrides: list[str] = []


def build_app(args: dict[str, Any]) -> Application:
    """Serve's import path (`bahe_ray.serve:build_app`, args {config: PROFILE, overrides: [...]})."""
    parsed = AppArgs.model_validate(args)
    return scorer_app(load_config(parsed.config, parsed.overrides))


@contextmanager
def running_scorer(cfg: Config) -> Iterator[str]:
    """The scorer app of a profile on cfg.serve.host:port while the block runs (yields its base URL)."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        serve.run(scorer_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        yield f"http://{cfg.serve.host}:{cfg.serve.port}"
    finally:
        serve.shutdown()


def serve_blocking(cfg: Config) -> None:
    """`bahe serve`: the scorer of a profile on cfg.serve.host:port until Ctrl-C, then Serve shuts down."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        serve.run(scorer_app(cfg), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        serve.shutdown()

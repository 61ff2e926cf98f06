"""Serve a model over an OpenAI-compatible HTTP API, with unmerged LoRA adapters chosen per request.

    python launch/serve.py model.path=smollm2-135m-instruct port=8000 \\
        lora.adapters=math=runs/math/final,chat=runs/chat/final

``model.path`` may also be a trainer run's adapter dir (``<output_dir>/final``): its base model
(``base_model_name_or_path``) is served, with the adapter under the run's name. Adapters beyond the
``engine.max_loras`` GPU slots (e.g. added at runtime with ``POST /v1/load_lora_adapter``) wait in CPU
memory and are swapped into the least recently used idle slot when a request names them. Engine
options are ``engine.*`` keys, server options ``serve.*``; ``host``/``port`` are top-level keys. Ctrl-C (or
SIGTERM) stops admitting requests, lets running ones finish for ``serve.drain_timeout_s``, then exits.

Exit codes: 0 stopped, 2 config error (one line, no traceback).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.config import Config, ConfigError, load_config  # noqa: E402

USAGE = "usage: python launch/serve.py [config=<name>.yaml] model.path=<dir|alias|adapter dir> [lora.adapters=name=dir,...] [port=8000] [key=value ...]"


def resolve_models(cfg: Config) -> tuple[str, str, dict[str, str]]:
    """(base model dir, served base name, adapters name -> dir), following an adapter dir to its base."""
    from trainer.models import resolve_model_path

    adapters = dict(cfg.lora.adapters)
    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"lora.adapters.{name}={path}: not a PEFT adapter directory (no adapter_config.json)")
    path = cfg.model.path
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():  # a trainer run's final/ dir: serve its base with it as an adapter
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"model.path={path}: adapter_config.json names no base_model_name_or_path; "
                              "set model.path=<base> lora.adapters=name=<adapter dir>")
        run = Path(path).resolve()
        name = run.parent.name if run.name in ("final", "adapter") else run.name
        adapters.setdefault(name, path)
        path = base
    try:
        base_dir = resolve_model_path(path)
    except Exception as e:
        raise ConfigError(f"model.path={path}: {e}") from None
    if not (Path(base_dir) / "config.json").is_file():
        raise ConfigError(f"model.path={path}: not a model directory (no config.json in {base_dir})")
    return base_dir, cfg.serve.served_model_name or path, adapters


def build_server(cfg: Config, console: Console | None = None):
    """The engine, the app and an uvicorn server bound to ``cfg.host:cfg.port`` (not started)."""
    from engine.llm_engine import LLMEngine
    from engine.lora import LoRAError
    from engine.server import build_app
    from trainer.config import resolve_device

    base_dir, served_name, adapters = resolve_models(cfg)
    options = dataclasses.asdict(cfg.engine)
    dtype = options.pop("dtype")
    options["enable_lora"] = options["enable_lora"] or bool(adapters)
    engine = LLMEngine(base_dir, dtype=dtype, tokenizer=cfg.model.tokenizer, device=resolve_device(cfg), **options)
    try:
        app = build_app(engine, served_name, base_dir, cfg.serve.max_waiting, cfg.serve.api_key, adapters)
    except LoRAError as e:
        raise ConfigError(f"lora.adapters: {e}") from None
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=cfg.serve.drain_timeout_s,
                            access_log=cfg.serve.log_requests, log_level="info" if console else "warning")
    if console is not None:
        console.print(summary(cfg, engine, served_name, base_dir, adapters))
    return DrainingServer(config)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, told to refuse new requests (503) the moment shutdown starts; uvicorn then
    waits up to ``timeout_graceful_shutdown`` for open requests before the lifespan stops the engine."""

    async def shutdown(self, sockets=None) -> None:
        self.config.app.state.engine.draining = True
        await super().shutdown(sockets)


def summary(cfg: Config, engine, served_name: str, base_dir: str, adapters: dict[str, str]) -> Table:
    table = Table(title="crucible server", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("url", f"http://{cfg.host}:{cfg.port}/v1")
    table.add_row("model", f"{served_name}  ({base_dir})")
    for name, path in adapters.items():
        table.add_row("adapter", f"{name}  ({path})")
    table.add_row("device / dtype", f"{engine.device} / {str(engine.dtype).removeprefix('torch.')}")
    table.add_row("max_model_len", str(engine.max_model_len))
    table.add_row("KV cache", f"{engine.runner.num_blocks} blocks x {engine.config.block_size} tokens")
    table.add_row("admission", f"max_num_seqs={engine.config.max_num_seqs}, max_waiting={cfg.serve.max_waiting}")
    table.add_row("auth", "bearer key" if cfg.serve.api_key else "none")
    return table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    console = Console(stderr=True)
    try:
        cfg = load_config(argv)
        server = build_server(cfg, console)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

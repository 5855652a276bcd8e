"""`loraplex` command line."""
from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

from models.base_model import EMBEDDED_BASE
from server.settings import ConfigError, load_settings


# configs/default.yaml of this checkout: the embedded base plus the demo experts
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def _serve(args: argparse.Namespace) -> int:
    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    settings = load_settings(config, {"host": args.host, "port": args.port, "replicas": args.replicas,
                                      "ray_address": args.address})
    if settings.replicas:
        from server.startup.ray_serve import run

        return run(settings)
    # Starting up makes half a million objects that live as long as the server (modules, the tokenizer, the
    # router's index): with the collector on, its full collections scan them again and again, a good part
    # of the time to ready (bench_startup). serve() turns it back on once loaded: startup's garbage
    # collected, the rest frozen, the freed heap given back.
    gc.disable()
    from server.startup.serve import serve

    return serve(settings)


def _train(args: argparse.Namespace) -> int:
    from training.chat_data import DataError
    from training.train import TrainConfig, train

    config = TrainConfig(
        data=args.data, name=args.name, out=args.out, base_model=args.base, rank=args.rank, alpha=args.alpha or 2 * args.rank,
        epochs=args.epochs, steps=args.steps, stop_after=args.stop_after, batch_size=args.batch_size, lr=args.lr,
        max_length=args.max_length, seed=args.seed, resume=args.resume, description=args.description,
        examples=args.example or [], stop=args.stop or [],
    )
    try:
        result = train(config)
    except (DataError, OSError) as exc:
        print(f"loraplex train: {exc}", file=sys.stderr)
        return 2
    state = "finished" if result.steps_done == result.total_steps else "stopped (resume with --resume)"
    print(f"{state}: {result.steps_done}/{result.total_steps} steps, last loss {result.losses[-1]:.4f}, out {args.out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from adapters.lora import AdapterError
    from training.merge import merge

    try:
        merge(args.adapter, args.out, base_model=args.base)
    except AdapterError as exc:
        print(f"loraplex merge: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.out}")
    return 0


def _tenants(args: argparse.Namespace) -> int:
    """Tenants and keys in the database the server reads (<data_dir>/tenants.sqlite3), also while it runs."""
    import json

    from server.tenants.store import Limits, TenantError, TenantStore

    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    store = TenantStore(load_settings(config, {}).data_dir)
    try:
        limits = json.loads(args.limits) if getattr(args, "limits", None) else None
        if args.action == "create":
            out = store.create_tenant(args.name, Limits.parse(limits)).public()
        elif args.action == "list":
            out = [{**t.public(), "keys": store.list_keys(t.id)} for t in store.list_tenants()]
        elif args.action == "limits":
            out = store.set_limits(args.tenant, Limits.parse(limits)).public()
        elif args.action == "issue":
            record, key = store.issue_key(args.tenant, args.name or "")
            out = {**record, "key": key}
        elif args.action == "rotate":
            record, key = store.rotate_key(args.tenant, args.key_id)
            out = {**record, "key": key, "replaces": args.key_id}
        elif args.action == "revoke":
            out = store.revoke_key(args.tenant, args.key_id)
        else:  # usage
            out = store.usage(store.tenant(args.tenant).id if args.tenant else None)
    except TenantError as exc:
        print(f"loraplex tenants: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:  # --limits that is not JSON
        print(f"loraplex tenants: --limits: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(json.dumps(out, indent=1))
    return 0


def _tenant_commands(commands) -> None:
    tenants = commands.add_parser("tenants", help="tenants, their keys and limits (the server's tenants: true)")
    tenants.add_argument("--config", help="YAML settings file: its data_dir holds the database")
    tenants.set_defaults(handler=_tenants)
    actions = tenants.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new tenant")
    create.add_argument("name")
    create.add_argument("--limits", help='JSON, e.g. \'{"requests_per_minute": 60, "max_concurrent": 4}\'')
    actions.add_parser("list", help="every tenant, its limits and keys (never the keys themselves)")
    limits = actions.add_parser("limits", help="set a tenant's limits (all of them; left out: unlimited)")
    limits.add_argument("tenant", help="tenant id or name")
    limits.add_argument("--limits", required=True)
    issue = actions.add_parser("issue", help="a new key for a tenant (printed once)")
    issue.add_argument("tenant", help="tenant id or name")
    issue.add_argument("--name", help="a label for the key")
    for action, text in (("rotate", "a new key replacing KEY_ID (revoked at once)"), ("revoke", "revoke KEY_ID")):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("tenant", help="tenant id or name")
        parser.add_argument("key_id")
    usage = actions.add_parser("usage", help="tokens per day, tenant and model")
    usage.add_argument("tenant", nargs="?", help="tenant id or name (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the base model and its experts over an OpenAI-compatible API")
    serve.add_argument("--config", help="YAML settings file (default: configs/default.yaml, the base and demo experts)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--replicas", type=int, help="engine replicas on Ray Serve behind one endpoint (needs "
                                                    "loraplex[ray]; default 0: one process)")
    serve.add_argument("--address", help="the Ray cluster to run the replicas on (default: start a local one)")
    serve.set_defaults(handler=_serve)

    train = commands.add_parser("train", help="train a QLoRA expert on OpenAI-format chat JSONL")
    train.add_argument("--data", required=True, help="JSONL, one {\"messages\": [...]} per line")
    train.add_argument("--name", required=True)
    train.add_argument("--out", required=True, help="folder for the adapter, expert.json and checkpoints")
    train.add_argument("--base", default=EMBEDDED_BASE, help="base model (as in the config)")
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 x rank)")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--steps", type=int, default=None, help="total steps (default: epochs x batches)")
    train.add_argument("--stop-after", type=int, default=None, help="stop at this step; continue with --resume")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--max-length", type=int, default=512)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train.add_argument("--description", default="")
    train.add_argument("--example", action="append", help="a router example prompt (repeatable)")
    train.add_argument("--stop", action="append", help="a default stop string (repeatable)")
    train.set_defaults(handler=_train)

    merge = commands.add_parser("merge", help="merge an adapter into the base: a standalone HF model folder")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--out", required=True)
    merge.add_argument("--base", default=EMBEDDED_BASE)
    merge.set_defaults(handler=_merge)
    _tenant_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bitsandbytes tries a hub-hosted CPU kernel at import and warns "pip install kernels" when it
    # is absent; it falls back to its own AVX-512 kernel, and a hub download is not wanted here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

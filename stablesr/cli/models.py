"""``stablesr models``: the official models by name, and what of each is already on this machine (works offline)."""

from __future__ import annotations

from ..hub import CFW_GB, OFFICIAL_MODELS, OFFICIAL_REPO, cached_file, hf_hub_cache, partial_downloads
from ..loading import DEFAULT_MODEL, ModelLoadError, cache_dir, check_model_folder


def add_models_parser(subparsers) -> None:
    m = subparsers.add_parser(
        "models", help="list the official models (--model NAME) and which are downloaded and converted here"
    )
    m.set_defaults(func=cmd_models)


def _converted_state(name: str) -> str:
    folder = cache_dir() / "converted" / name
    if not folder.exists():
        return "not cached (converted on first use)"
    try:
        check_model_folder(folder)  # headers only: quick
    except ModelLoadError as err:
        return f"broken, converted again on next use ({err})"
    return f"cached in {folder}"


def cmd_models(args) -> int:
    print(f"Official StableSR models (Hub repo {OFFICIAL_REPO}); use one with --model NAME.")
    print(f"Hugging Face cache: {hf_hub_cache()}   converted models: {cache_dir() / 'converted'}")
    for model in OFFICIAL_MODELS.values():
        default = " (default)" if model.name == DEFAULT_MODEL else ""
        files = ", ".join(
            f"{name} {'cached' if cached_file(model.repo_id, name) else 'not cached'}" for name in model.files
        )
        print(f"\n{model.name}{default}")
        print(f"  for:        {model.description}")
        print(f"  model:      {model.native_size} px, {model.prediction_type}, {model.default_steps} steps by default")
        print(f"  download:   {model.download_gb:.2f} GB ({model.checkpoint} {model.checkpoint_gb:.2f} GB + "
              f"{model.cfw} {CFW_GB:.2f} GB, the same file for every model)")
        print(f"  license:    {model.license}")
        print(f"  Hub files:  {files}")
        print(f"  converted:  {_converted_state(model.name)}")
    partial = partial_downloads(OFFICIAL_REPO)
    if partial:
        listed = ", ".join(f"{p.name} ({p.stat().st_size / 1e9:.2f} GB)" for p in partial)
        print(f"\nInterrupted downloads in the cache (the next download resumes them): {listed}")
    return 0

"""Faults in teacher ODE trajectory sets: a rerun into a folder made with another teacher or other settings
is refused before any compute, damaged shards are found and made again, and readers name the shard
they cannot read."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from train import ode_pairs

from conftest import random_model  # noqa: E402
from hiar import trajectories
from hiar.checkpoints import save_model  # noqa: E402
from hiar.config import kept_indices, load_config  # noqa: E402
from hiar.trajectories import ProvenanceError, ShardError, TrajectoryStore, read_trajectories  # noqa: E402
from hiar.training import main_guard  # noqa: E402

SETTINGS = ["--config_path", "tiny", "ode.num_trajectories=3", "ode.steps=4", "ode.batch_size=1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two random tiny teachers, and a set of 3 trajectories in shards of 2 made with the first."""
    root = tmp_path_factory.mktemp("ode_faults")
    cfg = load_config("tiny")
    teachers = [save_model(random_model(cfg, seed), cfg, root / f"teacher{seed}.safetensors") for seed in (0, 1)]
    ode_pairs.main([*SETTINGS, f"ode.teacher={teachers[0]}", f"ode.output_dir={root / 'pairs'}", "ode.per_shard=2"])
    return teachers, root / "pairs"


def copy_of(made, tmp_path) -> Path:
    out = tmp_path / "pairs"
    shutil.copytree(made[1], out)
    return out


def pairs(out: Path, teacher: Path, *more: str) -> None:
    ode_pairs.main([*SETTINGS, f"ode.teacher={teacher}", f"ode.output_dir={out}", *more])


def mtimes(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.tar"))}


def test_a_rerun_with_another_teacher_is_refused_before_any_compute(made, tmp_path, monkeypatch):
    (first, second), out = made[0], copy_of(made, tmp_path)
    before = mtimes(out)
    moved = shutil.copy(first, tmp_path / "moved.safetensors")
    pairs(out, moved, "ode.per_shard=2")  # the same teacher elsewhere: its content is what counts
    assert mtimes(out) == before
    config = (out / "config.yaml").read_text()

    def no_compute(*_, **__):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(ode_pairs, "load_generator", no_compute)
    refusal = rf"{re.escape(str(out))} holds .*teacher\.sha256: .*use another ode.output_dir"
    with pytest.raises(ProvenanceError, match=refusal):
        pairs(out, second, "ode.per_shard=2")
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: pairs(out, second, "ode.per_shard=2"))
    assert exit_info.value.code == 2
    assert mtimes(out) == before and (out / "config.yaml").read_text() == config  # still names the first teacher


def test_a_rerun_with_another_per_shard_is_refused_and_rebuild_replaces_the_set(made, tmp_path):
    (first, _), out = made[0], copy_of(made, tmp_path)
    with pytest.raises(ProvenanceError, match=r"ode.per_shard: 2 there, 1 now"):
        pairs(out, first, "ode.per_shard=1")
    assert json.loads((out / "manifest.json").read_text())["provenance"]["ode.per_shard"] == 2
    pairs(out, first, "ode.per_shard=1", "--rebuild")
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    assert [t["key"] for t in read_trajectories(out)] == [f"{i:08d}" for i in range(3)]
    pairs(out, first, "ode.per_shard=2", "--rebuild")  # fewer shards: the one past them goes
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.json", "shard-000000.tar",
                                                          "shard-000001.json", "shard-000001.tar"]
    store = TrajectoryStore(out)
    assert [store[i]["key"] for i in range(len(store))] == [f"{i:08d}" for i in range(3)]


def test_truncated_or_damaged_shards_are_found_and_made_again(made, tmp_path):
    """Shard 0 is cut short, shard 1 keeps its size but has a byte changed; both keep their names and
    records. A rerun makes both again (the same bytes: the CPU run is deterministic)."""
    (first, _), out = made[0], copy_of(made, tmp_path)
    shard0, shard1 = out / "shard-000000.tar", out / "shard-000001.tar"
    good0, good1 = shard0.read_bytes(), shard1.read_bytes()
    shard0.write_bytes(good0[: len(good0) // 2])
    damaged = bytearray(good1)
    damaged[len(damaged) // 3] ^= 0xFF
    shard1.write_bytes(bytes(damaged))
    pairs(out, first, "ode.per_shard=2")
    assert shard0.read_bytes() == good0 and shard1.read_bytes() == good1
    assert TrajectoryStore(out).verify() == 2
    # a tar without its record (the run died between the two writes) is not trusted either
    (out / "shard-000001.json").unlink()
    kept = shard0.stat().st_mtime_ns
    pairs(out, first, "ode.per_shard=2")
    assert (out / "shard-000001.json").is_file() and shard0.stat().st_mtime_ns == kept


def test_a_corrupt_shard_is_named_by_the_readers(made, tmp_path):
    out = copy_of(made, tmp_path)
    shard = out / "shard-000001.tar"
    good = shard.read_bytes()
    name = re.escape(str(shard))
    shard.write_bytes(good[: len(good) // 2])  # truncated: found on open, by its size
    for read in (lambda: TrajectoryStore(out), lambda: list(read_trajectories(out))):
        with pytest.raises(ShardError, match=rf"{name} has {len(good) // 2} bytes, the manifest records"):
            read()
    # a manifest without sizes (written before they were recorded): the tar's own error, named
    manifest = json.loads((out / "manifest.json").read_text())
    legacy = {**manifest, "shards": [{"file": s["file"], "count": s["count"]} for s in manifest["shards"]]}
    (out / "manifest.json").write_text(json.dumps(legacy))
    assert TrajectoryStore(out)[1]["key"] == "00000001"  # shard 0 is fine
    with pytest.raises(ShardError, match=rf"{name}: unreadable tar"):
        TrajectoryStore(out)[2]
    with pytest.raises(ShardError, match=rf"{name}: unreadable tar"):
        list(read_trajectories(out))
    (out / "manifest.json").write_text(json.dumps(manifest))
    # the same size, a corrupt safetensors header: found when the trajectory is read
    data = good.index(b"00000002.latents") + 512  # the member's data follows its 512-byte tar header
    shard.write_bytes(good[:data] + b"\xff" * 8 + good[data + 8:])  # the safetensors header length
    with pytest.raises(ShardError, match=rf"{name}: trajectory 00000002 is corrupt"):
        TrajectoryStore(out)[2]
    # changed tensor values read without error; verify() finds them by the checksum
    damaged = bytearray(good)
    damaged[data + 20_000] ^= 0xFF  # inside the 46 kB of latents
    shard.write_bytes(bytes(damaged))
    store = TrajectoryStore(out)
    assert store.verify([0]) == 1
    with pytest.raises(ShardError, match=rf"{name}: its sha256 differs from the manifest's"):
        store.verify()


def test_the_manifest_records_provenance_and_checksums(made):
    (first, _), out = made
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = load_config("tiny", ["ode.steps=4"])
    provenance = manifest["provenance"]
    assert provenance == json.loads((out / "run.json").read_text())["provenance"]
    assert provenance["teacher.sha256"] == trajectories.teacher_fingerprint(first)["sha256"]
    assert manifest["teacher"]["path"] == str(first)
    assert (provenance["ode.steps"], provenance["ode.per_shard"], provenance["ode.num_trajectories"]) == (4, 2, 3)
    assert provenance["keep"] == kept_indices(cfg) and provenance["runtime.dtype"] == "float32"
    assert {"ode.shift", "ode.guidance_scale", "ode.prompts", "prompts.sha256", "ode.seed", "ode.storage_dtype",
            "video.height", "video.num_latent_frames", "model.num_layers", "train.negative_prompt"} <= set(provenance)
    assert [(s["file"], s["count"]) for s in manifest["shards"]] == [("shard-000000.tar", 2), ("shard-000001.tar", 1)]
    for s in manifest["shards"]:
        data = (out / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_teacher_folder_is_fingerprinted_by_all_its_weight_files(tmp_path, monkeypatch):
    """A Wan folder: config.json and every weight shard count, other files (the VAE) do not; files over
    WHOLE_HASH_BYTES are hashed by size and samples, the last MiB included."""
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for i in (1, 2):
        (folder / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors").write_bytes(bytes(3 * 2**20))
    base = trajectories.teacher_fingerprint(folder)
    assert len(base["files"]) == 3 and all(f["hashed"] == "whole" for f in base["files"].values())
    (folder / "Wan2.1_VAE.pth").write_bytes(b"vae")
    assert trajectories.teacher_fingerprint(folder)["sha256"] == base["sha256"]
    monkeypatch.setattr(trajectories, "WHOLE_HASH_BYTES", 2**20)
    sampled = trajectories.teacher_fingerprint(folder)
    assert sampled["files"]["config.json"]["hashed"] == "whole"
    assert sampled["files"]["diffusion_pytorch_model-00002-of-00002.safetensors"]["hashed"].startswith("size and")
    last = folder / "diffusion_pytorch_model-00002-of-00002.safetensors"
    last.write_bytes(bytes(3 * 2**20 - 1) + b"\x01")
    assert trajectories.teacher_fingerprint(folder)["sha256"] != sampled["sha256"]

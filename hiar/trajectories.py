"""Teacher ODE trajectories on disk: how shards are written, checked and read back.

A trajectory is the teacher's Euler integration (`sampling.teacher_ode`) of one prompt from one noise
draw. It keeps one point of the teacher's grid per student step (`hiar.config.kept_indices`: by default
every (steps / S)-th, as the reference keeps 0, 12, 24, 36 of 48; their exact timesteps are stored with
them) and the final clean latents. Trajectories are grouped into shards of `per_shard`; shard i always
holds trajectories i * per_shard ... Ranks take shards i = rank, rank + world, ...; the manifest lists
every shard once all are written.

What made a set is on disk beside it, so a rerun never mixes trajectories of two settings:
* run.json, written (atomically) when a run starts, before any shard: the provenance (the teacher's
  fingerprint and every setting that shapes a trajectory, `train/ode_pairs.py` `run_record`) and its
  digest. A rerun whose provenance differs is refused (`claim`).
* shard-i.json beside shard-i.tar, written after the tar is in place: its trajectory count, size,
  sha256 and the provenance digest. A shard without one, or whose size or sha256 differs, is unfinished
  or damaged, whatever its name says, and is made again.
* manifest.json: the provenance and, per shard, count, size and sha256.

Readers check on open what costs no reading (every shard exists with the size the manifest records,
and a shard's member index when it is first opened); hashing every byte is `TrajectoryStore.verify`
(or `python train/ode_pairs.py --config_path ... --verify`), run on purpose: a full-scale set is
~670 GB in ~500 shards, minutes to hours of reading that no training start should pay.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hiar.atomic import atomic_path
from hiar.config import Config, ConfigError

MANIFEST, RUN = "manifest.json", "run.json"
REBUILD = "rerun train/ode_pairs.py with the same settings to rebuild it"
# Teacher files up to this size are hashed whole; larger ones by samples (`fingerprint`).
WHOLE_HASH_BYTES = 256 * 2**20
SAMPLE_BYTES, SAMPLES = 2**20, 16


class ShardError(RuntimeError):
    """A shard that cannot be read as its manifest describes; the message names the file and the fix."""


class ProvenanceError(ConfigError):
    """An output folder holding trajectories of other settings (exit code 2 under `main_guard`)."""


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:06d}.tar"


def record_path(tar: Path) -> Path:
    """The record written beside a finished shard (count, size, sha256, provenance digest)."""
    return tar.with_suffix(".json")


# -- fingerprints ----------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """sha256 of a whole file, read in chunks (shards are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> dict:
    """A file's identity: the sha256 of all of it up to WHOLE_HASH_BYTES; above, of its size and SAMPLES
    MiB at evenly spaced offsets, the first and last MiB included. A trained teacher differs from any
    other in nearly every weight, so the samples tell teachers apart, and a 57 GB 14B teacher is read in
    a second instead of minutes on every rank and rerun. The mtime is left out: a copy changes it, not
    the teacher."""
    size = path.stat().st_size
    if size <= WHOLE_HASH_BYTES:
        return {"bytes": size, "sha256": sha256_file(path), "hashed": "whole"}
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * k // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return {"bytes": size, "sha256": digest.hexdigest(), "hashed": f"size and {SAMPLES} sampled MiB"}


def teacher_files(path: Path) -> list[Path]:
    """The files `hiar.checkpoints.load_generator` reads for a teacher: the file itself, or a Wan /
    diffusers folder's (or its transformer/'s) config.json and every diffusion_pytorch_model*.safetensors."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"ode.teacher={path} does not exist: train a teacher (train/teacher.py) or point "
                          "ode.teacher at one")
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    return [f for f in [folder / "config.json", *sorted(folder.glob("diffusion_pytorch_model*.safetensors"))]
            if f.is_file()]


def teacher_fingerprint(path: str | os.PathLike) -> dict:
    """{"sha256": one digest of every teacher file, "files": {name: fingerprint}}; the path is not part of
    it, so a moved or copied teacher is the same teacher."""
    path = Path(path)
    files = {str(f.relative_to(path)) if f != path else "": fingerprint(f) for f in teacher_files(path)}
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"sha256": combined, "files": {name or path.name: fp for name, fp in files.items()}}


def provenance_digest(provenance: dict) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()


# -- the run record: which settings a folder's trajectories were made with ----------------------------


def _read_json(path: Path) -> dict | None:
    """A small JSON file of ours, or None when it is missing or unreadable (then it vouches for nothing)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:20]}..."  # a sha256 or a long prompt: enough to tell apart


def _differences(stored: dict | None, current: dict) -> str:
    if stored is None:
        return "no readable run.json records what made them"
    old = stored.get("provenance", {})
    diffs = [f"{k}: {_short(old.get(k))} there, {_short(v)} now" for k, v in current["provenance"].items()
             if old.get(k) != v]
    diffs += [f"{k}: only there" for k in old if k not in current["provenance"]]
    return "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")


def claim(folder: Path, run: dict, rebuild: bool, num_shards: int) -> None:
    """Make `folder` this run's before any compute. run: {"provenance": {...}, "digest", ...}. A folder
    with outputs of other settings, or of unknown ones (no run.json), is refused with a ProvenanceError
    naming what differs, unless `rebuild`: then run.json is replaced, the manifest and the shards past
    num_shards are removed, and each rank remakes its shards whose record names other settings."""
    run = json.loads(json.dumps(run))  # tuples -> lists, as read back
    folder.mkdir(parents=True, exist_ok=True)
    # Outputs are looked for before run.json is read: another rank writes run.json before any shard.
    outputs = [*folder.glob("shard-*.tar"), *folder.glob(MANIFEST)]
    stored = _read_json(folder / RUN)
    if stored is not None and stored.get("provenance") == run["provenance"]:
        return
    if outputs and not rebuild:
        raise ProvenanceError(f"{folder} holds trajectories made with other settings ({_differences(stored, run)}): "
                              "use another ode.output_dir, delete the folder, or pass --rebuild to replace them")
    if outputs:
        print(f"--rebuild: {folder} held trajectories of other settings ({_differences(stored, run)}); "
              "replacing them", file=sys.stderr)
        (folder / MANIFEST).unlink(missing_ok=True)
        for tar in folder.glob("shard-*.tar"):
            if int(tar.stem.removeprefix("shard-")) >= num_shards:  # no rank of this run writes it
                tar.unlink(missing_ok=True)
                record_path(tar).unlink(missing_ok=True)
    with atomic_path(folder / RUN) as tmp:
        tmp.write_text(json.dumps(run, indent=1))


# -- shards ----------------------------------------------------------------------------------------


def shard_count(per_shard: int, total: int, shard: int) -> int:
    return min(per_shard, total - shard * per_shard)


def write_shard(path: Path, records: list[dict], dtype: torch.dtype, digest: str = "") -> dict:
    """records: {key, caption, points [K, F, C, h, w], timesteps [K], final [F, C, h, w]} -> one webdataset
    tar, atomically; latents stored as safetensors in `dtype` (float32, the default, keeps the chord
    targets exact; bfloat16 and float16 halve the disk). Then its record (count, size, sha256, the
    provenance `digest`) beside it, last, so that a record vouches for a complete tar. Returns the record."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w") as tar:
            for r in records:
                latents = torch.cat([r["points"], r["final"][None]]).to(dtype).contiguous()  # [K + 1, F, C, h, w]
                members = {"latents.safetensors": st_save({"latents": latents}), "caption.txt": r["caption"].encode(),
                           "timesteps.json": json.dumps([float(t) for t in r["timesteps"]]).encode()}
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{r['key']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        record = {"file": path.name, "count": len(records), "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp),
                  "provenance": digest}
    with atomic_path(record_path(path)) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def shard_problem(folder: Path, shard: int, count: int, digest: str, checksum: bool) -> str | None:
    """Why shard `shard` is not a finished shard of the run with provenance `digest` holding `count`
    trajectories, or None when it is. Its name proves nothing: its record must exist and match, and its
    size (and, with `checksum`, its sha256: a full read) must be the recorded one."""
    tar = shard_path(folder, shard)
    if not tar.is_file():
        return "missing"
    record = _read_json(record_path(tar))
    if record is None:
        return f"no {record_path(tar).name} vouches for it (its write did not finish)"
    if record.get("provenance") != digest:
        return "made with other settings"
    if record.get("count") != count:
        return f"holds {record.get('count')} trajectories, {count} expected"
    if tar.stat().st_size != record.get("bytes"):
        return f"truncated or rewritten: {tar.stat().st_size} bytes, {record.get('bytes')} written"
    if checksum and sha256_file(tar) != record.get("sha256"):
        return "damaged: its sha256 differs from the one recorded when it was written"
    return None


def write_manifest(folder: Path, num_shards: int, per_shard: int, total: int, info: dict, digest: str) -> Path:
    """manifest.json: `info`, the trajectory count and every shard's record, once all are finished
    shards of provenance `digest` (their records are trusted: each rank checked its own)."""
    problems = [f"{shard_path(folder, i).name} ({p})" for i in range(num_shards)
                if (p := shard_problem(folder, i, shard_count(per_shard, total, i), digest, checksum=False))]
    if problems:
        raise FileNotFoundError(f"{folder}: shards {', '.join(problems[:4])} are not finished; rerun to complete them")
    shards = []
    for i in range(num_shards):
        record = _read_json(record_path(shard_path(folder, i)))
        shards.append({k: record[k] for k in ("file", "count", "bytes", "sha256")})
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps({**info, "trajectories": total, "shards": shards}, indent=1))
    return folder / MANIFEST


# -- reading -----------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict:
    """folder/manifest.json, after checking that every shard it lists exists with the recorded size
    (a stat each: no shard is read)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run train/ode_pairs.py with ode.output_dir={folder} "
                                "(it writes the manifest once every shard is finished)")
    manifest = _read_json(path)
    if manifest is None or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{path} is not a readable manifest: rerun train/ode_pairs.py with the same settings to "
                         "write it again")
    for s in manifest["shards"]:
        shard = folder / s["file"]
        if not shard.is_file():
            raise ShardError(f"{shard} is missing: {REBUILD}")
        if "bytes" in s and shard.stat().st_size != s["bytes"]:
            raise ShardError(f"{shard} has {shard.stat().st_size} bytes, the manifest records {s['bytes']} (truncated "
                             f"or rewritten): {REBUILD}")
    return manifest


def _decode(path: Path, key: str, members: dict[str, bytes]) -> dict:
    """One trajectory from its tar members: points [K, ...], timesteps [K], final, caption."""
    try:
        latents = st_load(members["latents.safetensors"])["latents"].float()
        return {"key": key, "caption": members["caption.txt"].decode(), "points": latents[:-1], "final": latents[-1],
                "timesteps": torch.tensor(json.loads(members["timesteps.json"]))}
    except KeyError as err:
        raise ShardError(f"{path}: trajectory {key} lacks its member {err}: {REBUILD}") from None
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ShardError(f"{path}: trajectory {key} is corrupt ({type(err).__name__}: {err}): {REBUILD}") from None


def _check_count(path: Path, found: int, listed: int) -> None:
    if found != listed:
        raise ShardError(f"{path} holds {found} trajectories, the manifest lists {listed} (it belongs to another "
                         f"set or is truncated): {REBUILD}")


def _stream(path: Path) -> Iterator[dict]:
    """One shard's raw samples, streamed by webdataset; a read error names the shard."""
    import webdataset as wds

    # Every rank reads every shard (callers pick their share), so no node or worker splitting.
    samples = iter(wds.WebDataset([str(path)], shardshuffle=False, nodesplitter=None, workersplitter=None))
    while True:
        try:
            raw = next(samples)
        except StopIteration:
            return
        except (tarfile.TarError, OSError, EOFError) as err:
            reason = str(err.args[0] if err.args else err).split(" @ ")[0]  # webdataset appends " @ <file object>"
            raise ShardError(f"{path}: unreadable tar ({reason}): {REBUILD}") from None
        yield raw


def read_trajectories(folder: str | os.PathLike) -> Iterator[dict]:
    """Every trajectory of the shards listed in folder/manifest.json, in order, streamed by webdataset."""
    folder = Path(folder)
    for s in read_manifest(folder)["shards"]:
        path, found = folder / s["file"], 0
        for raw in _stream(path):
            found += 1
            yield _decode(path, raw["__key__"], raw)
        _check_count(path, found, s["count"])


def _index(path: Path, count: int) -> tuple[tarfile.TarFile, list[str], dict[str, dict[str, tarfile.TarInfo]]]:
    """An open shard, its keys in written order and each key's members, checked against the manifest's
    count (reads the tar headers only)."""
    try:
        tar = tarfile.open(path, "r:")
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{path}: unreadable tar ({err}): {REBUILD}") from None
    index: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        key, _, suffix = member.name.partition(".")
        index.setdefault(key, {})[suffix] = member
    _check_count(path, len(index), count)
    return tar, sorted(index), index  # keys are zero-padded indices: sorted = written order


class TrajectoryStore:
    """Random access to the trajectories of folder/manifest.json without holding them in memory
    (16k full-scale trajectories are ~670 GB in float32): trajectory i is read from its shard when asked for.
    The shards are plain tars, so a member is one seek away once the shard's header index is read.
    Opening checks every shard's size against the manifest; `verify` hashes them (module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._shards = [(s["file"], s["count"]) for s in self.manifest["shards"]]
        self._open: tuple[str, tarfile.TarFile, list[str], dict[str, dict[str, tarfile.TarInfo]]] | None = None

    def __len__(self) -> int:
        return sum(count for _, count in self._shards)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"trajectory {i} of {len(self)}")
        for name, count in self._shards:
            if i < count:
                break
            i -= count
        if self._open is None or self._open[0] != name:  # one shard open at a time: batches are contiguous
            if self._open is not None:
                self._open[1].close()
            self._open = (name, *_index(self.folder / name, count))
        _, tar, keys, index = self._open
        path, key = self.folder / name, keys[i]
        try:
            members = {suffix: tar.extractfile(m).read() for suffix, m in index[key].items()}
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ShardError(f"{path}: trajectory {key} is unreadable ({err}): {REBUILD}") from None
        return _decode(path, key, members)

    def verify(self, shards: Iterable[int] | None = None) -> int:
        """Hash the shards (all, or the indices given) against the manifest's sha256 and raise a ShardError
        naming the first that differs; returns how many were checked. Reads every byte, so it is run on
        purpose (after copying a set, or when a read looks wrong), never on open."""
        listed = self.manifest["shards"]
        if any("sha256" not in s for s in listed):
            raise ShardError(f"{self.folder / MANIFEST} records no checksums (it predates them): remake the set with "
                             "train/ode_pairs.py to verify it")
        chosen = range(len(listed)) if shards is None else list(shards)
        for i in chosen:
            path = self.folder / listed[i]["file"]
            if sha256_file(path) != listed[i]["sha256"]:
                raise ShardError(f"{path}: its sha256 differs from the manifest's (damaged or replaced): {REBUILD}")
        return len(chosen)


def trajectory_batch(trajectories: Sequence[dict], indices: Sequence[int]) -> dict:
    """Trajectories `indices` (from `hiar.order.ShuffledOrder`), stacked: points [B, K, F, C, h, w],
    timesteps [B, K], final [B, F, C, h, w], captions."""
    chosen = [trajectories[i] for i in indices]
    return {"points": torch.stack([c["points"] for c in chosen]),
            "timesteps": torch.stack([c["timesteps"] for c in chosen]),
            "final": torch.stack([c["final"] for c in chosen]), "captions": [c["caption"] for c in chosen]}


def ode_regression_batch(trajectories: Sequence[dict], cfg: Config,
                         indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The ODE-regression batch of trajectories `indices`: for every block a random stored point.

    Returns inputs x [B, F, C, h, w], per-frame timesteps [B, F], targets (the trajectories' clean
    ends) and captions, on the CPU.
    """
    batch = trajectory_batch(trajectories, indices)
    b, num_points, frames = batch["points"].shape[:3]
    k = cfg.video.frames_per_block
    pick = torch.randint(num_points, (b, frames // k)).repeat_interleave(k, dim=1)  # [B, F]: one point per block
    rows = torch.arange(b)[:, None]
    x = batch["points"][rows, pick, torch.arange(frames)]
    return x, batch["timesteps"][rows, pick], batch["final"], batch["captions"]

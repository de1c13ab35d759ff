"""Teacher ODE trajectories on disk: how shards are written and read back.

A trajectory is the teacher's Euler integration (`sampling.teacher_ode`) of one prompt from one noise
draw. It keeps one point of the teacher's grid per student step (`hiar.config.kept_indices`: by default
every (steps / S)-th, as the reference keeps 0, 12, 24, 36 of 48; their exact timesteps are stored with
them) and the final clean latents. Trajectories are grouped into shards of `per_shard`; shard i always holds trajectories i * per_shard ... so a restarted run skips shards that
exist (each is written to a temporary name and renamed) and never duplicates or corrupts one. Ranks
take shards i = rank, rank + world, ...; the manifest lists every shard once all are written.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hiar.atomic import atomic_path


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:06d}.tar"


def write_shard(path: Path, records: list[dict], dtype: torch.dtype) -> None:
    """records: {key, caption, points [K, F, C, h, w], timesteps [K], final [F, C, h, w]} -> one webdataset
    tar, atomically; latents stored as safetensors in `dtype` (float32, the default, keeps the chord
    targets exact; bfloat16 and float16 halve the disk)."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for r in records:
            latents = torch.cat([r["points"], r["final"][None]]).to(dtype).contiguous()  # [K + 1, F, C, h, w]
            members = {"latents.safetensors": st_save({"latents": latents}), "caption.txt": r["caption"].encode(),
                       "timesteps.json": json.dumps([float(t) for t in r["timesteps"]]).encode()}
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{r['key']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _decode(key: str, members: dict[str, bytes]) -> dict:
    """One trajectory from its tar members: points [K, ...], timesteps [K], final, caption."""
    latents = st_load(members["latents.safetensors"])["latents"].float()
    return {"key": key, "caption": members["caption.txt"].decode(), "points": latents[:-1], "final": latents[-1],
            "timesteps": torch.tensor(json.loads(members["timesteps.json"]))}


def read_trajectories(folder: str | os.PathLike) -> Iterator[dict]:
    """Every trajectory of the shards listed in folder/manifest.json, in order, streamed by webdataset."""
    import webdataset as wds

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    # Every rank reads every shard (callers pick their share), so no node or worker splitting.
    shards = wds.WebDataset([str(folder / s["file"]) for s in manifest["shards"]], shardshuffle=False,
                            nodesplitter=None, workersplitter=None)
    for raw in shards:
        yield _decode(raw["__key__"], raw)


class TrajectoryStore:
    """Random access to the trajectories of folder/manifest.json without holding them in memory
    (16k full-scale trajectories are ~670 GB in float32): trajectory i is read from its shard when asked for.
    The shards are plain tars, so a member is one seek away once the shard's header index is read."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text())
        self._shards = [(s["file"], s["count"]) for s in manifest["shards"]]
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
            tar = tarfile.open(self.folder / name, "r:")
            index: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                index.setdefault(key, {})[suffix] = member
            self._open = (name, tar, sorted(index), index)  # keys are zero-padded indices: sorted = written order
        _, tar, keys, index = self._open
        key = keys[i]
        return _decode(key, {suffix: tar.extractfile(m).read() for suffix, m in index[key].items()})


def write_manifest(folder: Path, num_shards: int, per_shard: int, total: int, info: dict) -> Path:
    shards = [{"file": shard_path(folder, i).name, "count": min(per_shard, total - i * per_shard)}
              for i in range(num_shards)]
    missing = [s["file"] for s in shards if not (folder / s["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: shards {missing[:4]} are missing; rerun to complete them")
    with atomic_path(folder / "manifest.json") as tmp:
        tmp.write_text(json.dumps({**info, "trajectories": total, "shards": shards}, indent=1))
    return folder / "manifest.json"


def trajectory_batch(trajectories: Sequence[dict], indices: Sequence[int]) -> dict:
    """Trajectories `indices` (from `hiar.order.ShuffledOrder`), stacked: points [B, K, F, C, h, w],
    timesteps [B, K], final [B, F, C, h, w], captions."""
    chosen = [trajectories[i] for i in indices]
    return {"points": torch.stack([c["points"] for c in chosen]),
            "timesteps": torch.stack([c["timesteps"] for c in chosen]),
            "final": torch.stack([c["final"] for c in chosen]), "captions": [c["caption"] for c in chosen]}

"""Video files: a streaming mp4 writer that survives crashes, a reader, and exclusive output names.

Every output file is written as `<name>.partial` and renamed to `<name>` only once it is complete
and checked, so a file under its final name is always whole. The partial file is claimed before it
is written (`Claim`): created exclusively and locked while its writer lives, so two processes (or
two ranks of one run) never write the same name. The mp4 writer emits fragmented MP4 (an index after
every keyframe): a run that dies after an hour leaves a playable `<name>.mp4.partial` with everything
written so far. ffmpeg comes from the imageio-ffmpeg package.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch

from hiar.atomic import publish

PARTIAL = ".partial"


class VideoWriteError(OSError):
    """A video that could not be written completely; the message names the file."""


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


# -- exclusive output names -----------------------------------------------------------------------------


class Claim:
    """An output name held by this process: `<final>.partial` exists, is locked by us, and is the only
    place we write; `publish()` renames it to `final`, `release()` gives the name up."""

    def __init__(self, final: Path, fd: int, overwrite: bool):
        self.final, self.partial, self.overwrite = final, partial_path(final), overwrite
        self.fd: int | None = fd  # None once published or released

    @classmethod
    def take(cls, final: str | os.PathLike, overwrite: bool) -> Claim | None:
        """Claim `final`, or None when it is taken: by a finished file (unless `overwrite`), by a
        partial file another writer holds, or (without `overwrite`) by a partial file a crashed run
        left behind, which is not ours to replace."""
        final = Path(final).absolute()
        if final.is_dir():
            return None
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if overwrite else os.O_EXCL)
        try:
            fd = os.open(partial_path(final), flags, 0o666)
        except FileExistsError:
            return None
        claim = cls(final, fd, overwrite)
        if not claim._lock():
            claim._close()
            return None
        if not overwrite and os.path.lexists(final):  # checked after claiming: a finisher links, then unlinks
            claim.release()
            return None
        return claim

    def _lock(self) -> bool:
        """Lock the partial file; False when a live writer holds it or the path no longer names our file
        (its writer published it between our open and our lock)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass  # no locks on this filesystem: exclusive creation alone guards the name
        return self._still_ours()

    def write(self, data: bytes) -> Path:
        """Write `data` as the whole file, checking every byte is written, and publish; returns the final path."""
        view, written = memoryview(data), 0
        try:
            os.ftruncate(self.fd, 0)
            while written < len(data):
                n = os.pwrite(self.fd, view[written:], written)  # raises on ENOSPC / EFBIG
                if n == 0:
                    raise OSError(errno.EIO, "the disk took no more bytes")
                written += n
        except OSError as err:
            self.release()
            raise OSError(f"{self.partial}: {err.strerror or err} after {written} of {len(data)} bytes; "
                          "free space there and run again") from None
        return self.publish()

    def publish(self) -> Path:
        """Rename the partial file to the final name (never replacing a file without `overwrite`)."""
        try:
            publish(self.partial, self.final, self.overwrite)
        except FileExistsError:
            raise self._taken() from None
        finally:
            self._close()  # unlocks: the name is now the final file's
        return self.final

    def _taken(self) -> OSError:
        return OSError(f"{self.final} appeared while this run wrote it (another program made it); the output "
                       f"is kept as {self.partial}: rename it by hand")

    def release(self) -> None:
        """Give the name up: an empty partial file (a claim never written) is removed, one with data is
        kept for the user. Nothing once published or released."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_size == 0 and self._still_ours():
                os.unlink(self.partial)
        finally:
            self._close()

    def _close(self) -> None:
        os.close(self.fd)
        self.fd = None

    def _still_ours(self) -> bool:
        try:
            here, ours = os.stat(self.partial), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)


def claim_free(folder: str | os.PathLike, stem: str, suffixes: tuple[str, ...], overwrite: bool) -> list[Claim]:
    """Claims of folder/stem + each suffix, or of the first 'stem (2)', 'stem (3)', ... free for all of
    them (a video and its latents share a name)."""
    for i in range(1, 10_000):
        name = stem if i == 1 else f"{stem} ({i})"
        claims = []
        for suffix in suffixes:
            claim = Claim.take(Path(folder) / f"{name}{suffix}", overwrite)
            if claim is None:
                break
            claims.append(claim)
        else:
            return claims
        for claim in claims:
            claim.release()
    raise OSError(f"{Path(folder) / stem}: 10000 names of this stem are taken; choose another --output_folder")


def claimed(target: str | os.PathLike | Claim) -> Claim:
    """`target` if it is a claim, else a claim of that path that replaces what is there (the writers of
    evaluation and training samples own their folders)."""
    claim = target if isinstance(target, Claim) else Claim.take(target, overwrite=True)
    if claim is None and Path(target).is_dir():
        raise VideoWriteError(f"{target} is a directory; choose a file name for the output")
    if claim is None:
        raise VideoWriteError(f"{target} is being written by another process; wait for it or choose another name")
    return claim


# -- frames ---------------------------------------------------------------------------------------------


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def ffmpeg_command(path: Path, fps: float, height: int, width: int) -> list[str]:
    """H.264 in fragmented mp4 from raw RGB frames on stdin; progress (frames, bytes) as key=value lines
    on stdout. The output is named as an absolute path with an explicit format, so no file name (one
    starting with '-', or without .mp4) can be read as an option or change the container."""
    import imageio_ffmpeg

    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-crf", "10", "-pix_fmt", "yuv420p",
            "-movflags", "frag_keyframe+empty_moov", "-progress", "pipe:1", "-f", "mp4", "-y", str(path.absolute())]


class _Log(threading.Thread):
    """Drains ffmpeg's stdout + stderr (a full pipe would stall it): the last progress values and errors."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.progress, self.errors = stream, {}, []
        self.start()

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").strip()
            key, sep, value = line.partition("=")
            if sep and " " not in key:
                self.progress[key] = value
            elif line:
                self.errors = [*self.errors[-4:], line]


class VideoWriter:
    """Append frames [F, 3, H, W] in [-1, 1] to an H.264 mp4 as they are produced.

    `target` is a final path (claimed here, replacing an existing file) or a `Claim`. Frames stream
    into `<name>.partial`; `close()` checks ffmpeg's exit status, that it encoded every frame and
    that every byte it wrote is on disk, then renames the file to its final name. Any failure raises
    `VideoWriteError` naming the file and keeps what was written as `<name>.partial`.
    """

    def __init__(self, target: str | os.PathLike | Claim, fps: float, height: int, width: int):
        self.claim = claimed(target)
        self.path = self.claim.final
        self.frames = 0
        try:  # a session of its own: Ctrl-C stops us, and abort() then lets ffmpeg finish the partial file
            self._proc = subprocess.Popen(ffmpeg_command(self.claim.partial, fps, height, width), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            self.claim.release()
            raise VideoWriteError(f"{self.path}: could not start ffmpeg ({err}); reinstall imageio-ffmpeg") from None
        self._log = _Log(self._proc.stdout)
        self._done = False

    def write(self, frames: torch.Tensor) -> None:
        for frame in to_uint8(frames):
            try:
                self._proc.stdin.write(np.ascontiguousarray(frame).data)
            except OSError:  # ffmpeg died (disk full, killed): its exit status says why
                raise self._failure(self._ended(self._finish()) or "stopped taking frames") from None
            self.frames += 1

    def _finish(self) -> int:
        """Close ffmpeg's input, wait for it to exit, read its last words; returns its exit status."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass  # the buffered frames could not be delivered: the frame count check reports it
        status = self._proc.wait()
        self._log.join()
        self._done = True
        return status

    @staticmethod
    def _ended(status: int) -> str:
        """How ffmpeg ended, if not well."""
        if status < 0:  # e.g. SIGXFSZ: over the file size limit
            return f"was killed by {signal.Signals(-status).name}"
        return f"exited with status {status}" if status else ""

    def _failure(self, what: str) -> VideoWriteError:
        encoded = self._log.progress.get("frame", "0")
        why = f", {self._log.errors[-1]}" if self._log.errors else ""
        self.claim.release()
        kept = f"what was written is kept as {self.claim.partial}" if self.claim.partial.exists() else "nothing was kept"
        return VideoWriteError(f"{self.path}: ffmpeg {what} ({encoded} of {self.frames} frames encoded{why}); {kept}: "
                               "check free space and quota there, then run again")

    def close(self) -> None:
        if self._done:
            return
        ended = self._ended(self._finish())
        if ended:
            raise self._failure(ended)
        if self._log.progress.get("frame") != str(self.frames):
            raise self._failure("encoded too few frames")
        size = os.path.getsize(self.claim.partial)
        if self._log.progress.get("total_size") != str(size) or size == 0:
            raise self._failure(f"wrote {self._log.progress.get('total_size')} bytes but {size} reached the disk")
        self.claim.publish()

    def abort(self) -> None:
        """Stop without publishing (the run failed): ffmpeg finishes what it was given, which stays as
        `<name>.partial` (fragmented: playable)."""
        if self._done:
            return
        self._finish()
        self.claim.release()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as [F, H, W, 3] uint8."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)


def video_fps(path: str | os.PathLike) -> float:
    """Frames per second in a video file's header (without decoding it)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return float(next(reader)["fps"])
    finally:
        reader.close()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write uint8 frames [F, H, W, 3] to an mp4: `path` is replaced only once the new file is whole and
    checked; a failure leaves what was written as `<path>.partial`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frames_t = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, 3, H, W] in [-1, 1]
    with VideoWriter(path, fps, frames.shape[1], frames.shape[2]) as writer:
        writer.write(frames_t)

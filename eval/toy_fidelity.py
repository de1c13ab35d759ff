"""Does a toy model draw what its captions say? Samples held-out clips and measures every prompted object.

    python -m eval.toy_fidelity --checkpoint runs/toy/teacher/model.safetensors --sampler teacher --out docs/toy_teacher
    python -m eval.toy_fidelity --checkpoint runs/toy/hiar/model.safetensors --out runs/toy/hiar/fidelity
    python -m eval.toy_fidelity --checkpoint runs/toy/self_forcing/model.safetensors sampling.method=frame_first
    python -m eval.toy_fidelity --checkpoint checkpoints/toy_hiar.safetensors --captions template held_out --seconds 60

`--sampler codec`: no model, the held-out clips themselves through the toy codec (of the checkpoint's
config): the ceiling every model is measured against, with its PSNR; with `--speed` every object moves
at that speed (how much motion within a latent frame costs the codec). `--sampler teacher`: the
bidirectional teacher's ODE with CFG (train.sample_steps, train.sample_shift, train.guidance_scale of
the checkpoint's config); with `--context N` it is given each held-out clip's first N latent frames
and draws the rest (does it continue the clip the way the caption says?). `--sampler student`
(default): the causal student in its config's order (trailing section.key=value overrides change it),
one video of the config's length or of `--seconds`. `--checkpoint` may be a run's training checkpoint,
checkpoints/step-N/ or train/distill.py's model.pt in it (keep them all with train.keep_checkpoints=0): the
model at that step, or with `--use_ema` its EMA; the teacher's too.
`--trajectories DIR`: no model either, a set of teacher ODE trajectories (train/ode_pairs.py's folder)
decoded with the checkpoint's codec and measured against their own captions, the first `--num_clips`:
what the ODE initialisation is taught to draw, reported under `trajectories`.
`--split validation`: other clips and other noise than the test clips every result is reported on, for
choosing a run's checkpoint (eval.toy_select) without scoring the choice on the clips that made it.
`--captions`: how the held-out clips are phrased, the training template and/or the held-out
phrasings (hiar/captions.py), each reported on its own; `varied`: as training phrases its clips (other
scenes, so other captions, in the same forms). Per prompted object: colour, shape, direction,
speed, presence over time; per clip: background and count (hiar/toyfidelity.py). Writes results.json
(every set's summary under by_captions, the first set's colour fidelity and moving at the top, as
eval.toy_results reads them) and contact_sheet.png (six frames of the first eight clips of the first
set). A missing checkpoint or a bad override ends it with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hiar.checkpoints import CheckpointError
from hiar.outputs import exit_code
from hiar.report import percent
from hiar.toyfidelity import (CAPTION_CHOICES, CLIP_SETS, SAMPLERS, evaluate, evaluation_config, question,
                              trajectory_fidelity, write_fidelity)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/toy/teacher_long/model.safetensors")
    p.add_argument("--num_clips", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sampler", choices=SAMPLERS, default="student")
    p.add_argument("--captions", nargs="+", choices=CAPTION_CHOICES, default=["template"],
                   help="caption sets, each reported on its own (the first also at the top of results.json)")
    p.add_argument("--seconds", type=float, help="video length (student, codec; default: the config's)")
    p.add_argument("--speed", type=float, help="codec sampler: every object moves this many px a frame "
                   "(default: each its own)")
    p.add_argument("--context", type=int, default=0, help="teacher sampler: give it the first N latent frames "
                   "of each held-out clip and let it draw the rest (where objects start is given, where they "
                   "go is the model's)")
    p.add_argument("--trajectories", help="measure the clean ends of this set of ODE pairs against their own "
                   "captions instead of sampling held-out clips")
    p.add_argument("--use_ema", action="store_true", help="a training checkpoint (model.pt, or a "
                   "run's step-N/ folder) as --checkpoint: its EMA instead of the weights")
    p.add_argument("--split", choices=CLIP_SETS, default="test", help="the test clips every result is reported "
                   "on, or the validation clips a run's checkpoint is chosen on (eval.toy_select)")
    p.add_argument("--out", default="runs/toy/fidelity")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (student sampler)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():  # a file, or a run's checkpoints/step-N/ folder
        raise ValueError(f"--checkpoint {args.checkpoint} does not exist: train it first (launch/reproduce_toy.sh) or "
                         "give another")
    if args.num_clips < 1 or args.batch_size < 1:
        raise ValueError("--num_clips and --batch_size must be at least 1")
    if args.seconds is not None and args.seconds <= 0:
        raise ValueError(f"--seconds={args.seconds}: give a positive length")
    if len(set(args.captions)) != len(args.captions):
        raise ValueError(f"--captions {' '.join(args.captions)}: name each set once")
    if args.trajectories:
        if args.sampler != "student" or args.seconds or args.speed is not None or args.context or args.split != "test":
            raise ValueError("--trajectories measures a set of ODE pairs: no --sampler, --seconds, --speed, --context "
                             "or --split")
        cfg = evaluation_config(args.checkpoint, args.overrides, None)
        summary, videos = trajectory_fidelity(args.trajectories, cfg, args.num_clips)
        result = {"by_captions": {"trajectories": summary}, "clips": summary["clips"]}
    else:
        result, videos = evaluate(args.checkpoint, args.overrides, args.sampler, args.num_clips, args.batch_size,
                                  args.captions, args.seconds, args.speed, args.context, args.use_ema, args.split)
    asked = question(args.overrides, args.seconds, args.sampler, args.use_ema, args.context, args.speed, args.split)
    result = {"checkpoint": args.checkpoint, "trajectories": args.trajectories, **asked, **result}
    out = Path(args.out)
    write_fidelity(out, result, videos)
    for name, s in result["by_captions"].items():
        print(f"{name}: colour {percent(s['colour'])}, shape {percent(s['shape'])}, direction "
              f"{percent(s['direction'])} ({percent(s['direction_of_moving'])} of moving; last fifth "
              f"{percent(s['direction_by_segment'][-1])}), count {percent(s['count'])}, presence "
              f"{percent(s['presence'])} (last fifth {percent(s['presence_by_segment'][-1])}) of {s['objects']} "
              f"objects in {s['clips']} clips; colour fidelity {percent(s['colour_fidelity'])}, "
              f"moving {percent(s['moving'])}")
        scenes = s["direction_by_scene"]
        print(f"  direction of moving objects: alone {percent(scenes['one_object'])}, two going the same way "
              f"{percent(scenes['two_same_way'])}, two going two ways {percent(scenes['two_ways'])} (of those wrong, "
              f"{percent(scenes['other_objects_way'])} the other object's way; chance 33%)")
    psnr = f"PSNR {result['psnr']:.2f} dB; " if "psnr" in result else ""
    print(f"{psnr}wrote {out / 'results.json'} and {out / 'contact_sheet.png'}")
    return result


def cli(argv=None) -> int:
    """main() as a program: bad input is one 'error: ...' line and exit code 2, not a traceback."""
    return exit_code(lambda: main(argv), also=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(cli())

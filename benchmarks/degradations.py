"""Speed of the degradations at 896x512 on this CPU -> benchmarks/results/degradations.json.

FlowBasedDegradation with the DIS presets ultrafast / fast / medium: frames per second of the whole
degradation, the time of the DIS flow alone, and the overhead of everything else (colour blending + motion
blur) relative to the flow. ClassicDegradation order 1 and 2: frames per second. All measured in one run on
the real bigbuckbunny clip; the best of `--repeats` runs is kept (the machine may be shared).

    PYTHONPATH=. python benchmarks/degradations.py [--frames 17] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade_vsr.core.optical_flow import compute_flow
from cascade_vsr.core.video import read_video, sample_video_path  # noqa: E402
from cascade_vsr.degradations.classic import ClassicDegradation  # noqa: E402
from cascade_vsr.degradations.flow_based import FlowBasedDegradation, FlowDegradationConfig  # noqa: E402

SIZE = (512, 896)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "degradations.json")
    args = parser.parse_args()

    source = read_video(sample_video_path("bigbuckbunny.mp4"), start=40, num_frames=args.frames)
    frames = np.stack([cv2.resize(f, SIZE[::-1], interpolation=cv2.INTER_AREA) for f in source])
    num = len(frames)
    rows = []
    # (preset, motion-blur block size): 16 is the default; 32 shows the cost of the blocks' halos
    for preset, block in (("ultrafast", 16), ("fast", 16), ("medium", 16), ("fast", 32)):
        degradation = FlowBasedDegradation(FlowDegradationConfig(dis_preset=preset, block_size=block))
        flow = compute_flow(frames, preset)
        flow_time = best_time(lambda p=preset: compute_flow(frames, p), args.repeats)
        rest_time = best_time(lambda d=degradation, f=flow: d.apply(frames, 0, flow=f), args.repeats)
        total_time = best_time(lambda d=degradation: d.apply(frames, 0), args.repeats)
        rows.append(
            {
                "degradation": f"flow ({preset})" + ("" if block == 16 else f" block {block}"),
                "fps": num / total_time,
                "flow_ms_per_frame": 1000 * flow_time / num,
                "rest_ms_per_frame": 1000 * rest_time / num,
                "rest_over_flow": rest_time / flow_time,
                "mean_flow_px": float(np.linalg.norm(flow, axis=-1).mean()),
            }
        )
    for order in (1, 2):
        degradation = ClassicDegradation(order=order)
        total_time = best_time(lambda d=degradation: d(frames, 0), args.repeats)
        rows.append({"degradation": f"classic order {order}", "fps": num / total_time})

    print(f"{'degradation':<22}{'fps':>8}{'flow ms/f':>11}{'rest ms/f':>11}{'rest/flow':>11}")
    for row in rows:
        extra = (
            f"{row['flow_ms_per_frame']:>11.1f}{row['rest_ms_per_frame']:>11.1f}{row['rest_over_flow']:>11.2f}"
            if "flow_ms_per_frame" in row
            else ""
        )
        print(f"{row['degradation']:<22}{row['fps']:>8.1f}{extra}")
    result = {
        "size": list(SIZE),
        "frames": num,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cv2_threads": cv2.getNumThreads(),
        "note": "best of repeats on a CPU shared with other jobs; rest = colour blending + motion blur",
        "targets": {"flow_fast_fps": 15, "rest_over_flow_max": 0.5},
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Ports torchvision (or EfficientAD PDN) weights to a kdjax .npz file, without torch.

    python tools/port_weights.py --arch wide_resnet50_2 --src wide_resnet50_2-95faca4d.pth \
        --out ~/.cache/kdjax/wide_resnet50_2-95faca4d.kdjax.npz

``--src`` may be a local .pth, an http(s) URL (downloaded with a progress
bar), or ``auto`` (the official torchvision file from the cache or
download.pytorch.org, ported into the cache). When the file name carries torchvision's sha256 prefix
(``name-<8 hex>.pth``) the file is verified. Without ``--out`` the port is
written to the kdjax cache ($KDJAX_CACHE or ~/.cache/kdjax), where
``teacher.weights=auto`` finds it. Prints the time each stage took.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    from kdjax import weights as W

    ap = argparse.ArgumentParser(description="Port PyTorch teacher weights to kdjax (.npz), torch-free.")
    ap.add_argument("--arch", required=True,
                    help="wide_resnet50_2, wide_resnet101_2, resnet18, resnet34, resnet50, pdn_small, pdn_medium")
    ap.add_argument("--src", required=True,
                    help="a .pth file, an http(s) URL, or 'auto' (official file: cache, else download)")
    ap.add_argument("--out", default=None, help="output .npz (default: the kdjax cache, used by 'auto')")
    ap.add_argument("--no-sha-check", action="store_true", help="skip the sha256 check of the file name")
    args = ap.parse_args(argv)

    t0 = time.time()
    src = args.src
    tmpdir = None
    if src == "auto":  # the official file: cached .pth, else download; port into the cache
        try:
            _, desc = W._resolve_auto(args.arch)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{desc} in {time.time() - t0:.2f} s")
        return 0
    if src.startswith(("http://", "https://")):
        tmpdir = tempfile.mkdtemp(prefix="kdjax-port-")
        dest = os.path.join(tmpdir, os.path.basename(src.split("?")[0]) or "weights.pth")
        try:
            W.download(src, dest)
        except Exception as e:  # noqa: BLE001 - report any download failure plainly
            print(f"error: could not download {src}: {type(e).__name__}: {e}. Download it by other means "
                  "and pass the local file with --src.", file=sys.stderr)
            return 2
        print(f"downloaded in {time.time() - t0:.1f} s")
        src = dest
    if args.out:
        out = args.out
    elif args.arch in W.TORCHVISION_FILES or args.arch in W.PDN_FILES:
        out = os.path.join(W.cache_dir(), W._ported_name(args.arch))
    else:
        out = os.path.splitext(os.path.basename(src))[0] + ".kdjax.npz"
    t1 = time.time()
    try:
        if args.arch in W.PDN_FILES:
            module = W.make_teacher_module(args.arch)
            variables = W.teacher_variables_from_state_dict(args.arch, W.load_torch_checkpoint(src), module,
                                                            what=src)
            W.save_ported(out, variables, {"arch": args.arch, "width_divisor": 1,
                                           "source": os.path.basename(src)})
        else:
            W.port_torchvision(args.arch, src, out=out, check_sha=not args.no_sha_check)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if tmpdir:
            for f in os.listdir(tmpdir):
                os.remove(os.path.join(tmpdir, f))
            os.rmdir(tmpdir)
    size = os.path.getsize(out) / 2**20
    print(f"ported {args.arch} from {args.src} to {out} ({size:.1f} MiB) in {time.time() - t1:.2f} s "
          f"(total {time.time() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

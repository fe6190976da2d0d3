"""python -m dimo_jax.convert KIND --src SRC --dst DST (see dimo_jax/convert/__init__.py).

A source or destination that does not fit ends the run with one `error: ...` line on stderr
and exit status 1, never a traceback.
"""

import argparse
import json
import sys

from dimo_jax import modeldir
from dimo_jax.convert import CONVERTERS, converter, options as converter_options
from dimo_jax.convert.common import ConversionError


def _flag(option: str) -> str:
  return "--" + option.replace("_", "-")


def _one_line(error: Exception) -> str:
  """The error as one line (`FILE: what was expected, what was found`)."""
  if isinstance(error, OSError) and error.filename:  # "[Errno 13] ... 'path'" -> "path: ..."
    text = f"{error.filename}: {error.strerror or error}"
  else:
    text = str(error)
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dimo_jax.convert", description=__doc__)
  parser.add_argument("kind", choices=sorted(CONVERTERS), help="what SRC is")
  parser.add_argument("--src", required=True, help="the released checkpoint (file or folder)")
  parser.add_argument("--dst", required=True, help="the model directory to write")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="attention heads (halton-maskgit: not readable from the weights; "
                           "default 16, the release's)")
  parser.add_argument("--codebook-size", type=int, default=None,
                      help="halton-maskgit: codes V, when the weights' V + C is not ImageNet's "
                           "1024 + 1000")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="halton-maskgit: classes C (see --codebook-size)")
  parser.add_argument("--resolution", type=int, default=None,
                      help="meissonic: image side in pixels (default 1024, the release's)")
  parser.add_argument("--config", default=None,
                      help="maskbit, maskbit-tokenizer: the release's YAML (configs/generator or "
                           "configs/tokenizer of markweberdev/maskbit)")
  args = parser.parse_args(argv)
  options = {name: value for name, value in (("num_heads", args.num_heads),
                                             ("codebook_size", args.codebook_size),
                                             ("num_classes", args.num_classes),
                                             ("resolution", args.resolution),
                                             ("config", args.config))
             if value is not None}
  accepted = converter_options(args.kind)
  refused = [_flag(name) for name in options if name not in accepted]
  if refused:
    takes = ", ".join(_flag(name) for name in accepted) or "no options"
    print(f"error: {args.kind} does not take {', '.join(refused)} (it takes {takes})",
          file=sys.stderr)
    return 1
  try:
    converter(args.kind)(args.src, args.dst, **options)
  except (ConversionError, modeldir.DestinationError, json.JSONDecodeError, OSError) as e:
    # OSError: FileNotFoundError for a missing source file, PermissionError or a read-only
    # filesystem met while writing DST.
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

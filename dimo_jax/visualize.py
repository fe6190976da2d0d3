"""Sample grids: PNGs a person looks at instead of reading numbers."""

import os
from typing import Dict, Optional

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images: np.ndarray, rows: int, scale: Optional[int] = None,
               pad: int = 1) -> np.ndarray:
  """float[N, H, W] or [N, H, W, 3] in [0, 1] -> uint8[rows*(H*s+p)+p, cols*(W*s+p)+p, 3].

  `scale` s enlarges each pixel; by default 4 for token-sized images (under 64 pixels a side,
  one pixel a token) and 1 for decoded pictures.
  """
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = np.repeat(images[..., None], 3, axis=-1)
  n, h, w, _ = images.shape
  if scale is None:
    scale = 4 if max(h, w) < 64 else 1
  cols = -(-n // rows)
  images = np.kron(images, np.ones((1, scale, scale, 1), np.float32))
  h, w = h * scale, w * scale
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 0.5, np.float32)
  for i, image in enumerate(images):
    r, c = i % rows, i // rows
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
  return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
  """Saves uint8[H, W, 3] through a temporary file beside `path`, so a PNG on disk is always
  whole; the temporary file never outlives a failed write."""
  tmp = f"{path}.{os.getpid()}.tmp.png"
  try:
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise


def side_by_side(panels: Dict[str, np.ndarray], path: str, gap: int = 12) -> None:
  """Saves labelled uint8[H, W, 3] panels left to right as one PNG."""
  title_h = 18
  height = max(p.shape[0] for p in panels.values()) + title_h
  width = sum(p.shape[1] for p in panels.values()) + gap * (len(panels) + 1)
  canvas = Image.new("RGB", (width, height + gap), "white")
  draw = ImageDraw.Draw(canvas)
  x = gap
  for title, panel in panels.items():
    draw.text((x, 3), title, fill="black")
    canvas.paste(Image.fromarray(panel), (x, title_h))
    x += panel.shape[1] + gap
  save_png(np.asarray(canvas), path)

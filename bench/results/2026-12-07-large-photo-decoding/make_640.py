"""The 640 px copy used by loader_ab.py and trainer_ab.sh: 640 random Caltech-101 photos (seed 1), each scaled
(bicubic) to 640 px on its long side and saved as a JPEG of quality 90 under /tmp/big640/train/<class>/."""
import glob
import os
import random

from PIL import Image

files = sorted(glob.glob("/work/shared/data/caltech101/101_ObjectCategories/*/*.jpg"))
random.seed(1)
for i, f in enumerate(random.sample(files, 640)):
    d = f"/tmp/big640/train/{f.split('/')[-2]}"
    os.makedirs(d, exist_ok=True)
    im = Image.open(f).convert("RGB")
    w, h = im.size
    s = 640 / max(w, h)
    im.resize((round(w * s), round(h * s)), Image.BICUBIC).save(f"{d}/{i}.jpg", quality=90)

import numpy as np

from ddpm_codec.eval.baselines import grid_of, lossless_one_image, lossless_table
from conftest import tiny_images


def test_grid_holds_every_image_in_place():
    ims = tiny_images(5, seed=2)
    g = grid_of(ims)
    h, w, _ = ims[0].shape
    assert g.shape == (2 * h, 3 * w, ims[0].shape[2])
    for i, im in enumerate(ims):
        r, c = divmod(i, 3)
        assert np.array_equal(g[r * h:(r + 1) * h, c * w:(c + 1) * w], im)


def test_one_image_beats_one_file_each_on_repeated_images():
    ims = [tiny_images(1, seed=3)[0]] * 16  # per-file headers dominate; one image shares them
    per_file, one = lossless_table(ims), lossless_one_image(ims)
    assert set(one) == set(per_file) and "png" in one
    for name in one:
        assert 0 < one[name] < per_file[name]
    assert lossless_one_image([ims[0], ims[0][:4]]) == {}  # sizes differ: no grid

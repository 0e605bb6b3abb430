"""``python -m napari_ssemnet``: the ``napari-ssemnet`` command line."""

from napari_ssemnet.cli import console_main

if __name__ == "__main__":
    console_main()

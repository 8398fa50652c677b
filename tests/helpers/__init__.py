"""What several test modules share, one meaning per name:

- ``data``: small shards with a label and a payload, their index, the fixed per-slot loss and a
  training loop over a loader.
- ``tars``: tars written every reference way (``webdataset``, ``tarfile``, GNU ``tar``, random
  layouts) and read back by the references (``tarfile`` offsets, WebDataset's samples).
- ``loaders``: the DataLoaders the tests train with.
- ``servers``: servers on 127.0.0.1 (moto's S3 API).
- ``guards``: a hang is a test failure.
- ``resume_child``: the training process the SIGKILL-and-resume test kills.
"""

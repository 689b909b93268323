"""What keyedge ships to a device -- ``cpp/`` (the C++ runtime and its CMake templates) and
``targets/`` (TensorRT target profiles) -- as the data package ``keyedge.share.export``
(see ``keyedge/core/resources.py``)."""

// The package config of the fuzz build (written by make_corpus.py): the artifact its corpus's bundles hold.
#pragma once
#define KEYEDGE_EXPECTED_FINGERPRINT "c62a34856a1985dfd620f0d94d4580af"
#define KEYEDGE_EXPECTED_HEIGHT 16
#define KEYEDGE_EXPECTED_WIDTH 16
#define KEYEDGE_EXPECTED_CLASSES 10
#define KEYEDGE_MODEL_FILE "model.kes"
#define KEYEDGE_TRUSTED_PUBLISHERS {"d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"}

"""The generated protobuf code matches protos/datastore.proto under the pinned grpcio-tools."""
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh():
    r = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, f"stale generated code; run `python protos/generate.py`\n{r.stderr}"


def test_response_roundtrip_to_draft_tree():
    from client.datastore_client import tree_from_response
    from protos import datastore_pb2 as pb

    resp = pb.RetrieveResponse(tokens=[4, 5, 8], parents=[-1, 0, -1], probs=[0.9, 0.5, 0.1], sources=bytes([1, 3, 1]))
    wire = pb.RetrieveResponse.FromString(resp.SerializeToString())
    t = tree_from_response(7, wire)
    assert t.tokens.tolist() == [7, 4, 5, 8] and t.parents.tolist() == [-1, 0, 1, 0]
    assert np.allclose(t.probs, [1, 0.9, 0.5, 0.1]) and t.sources.tolist() == [0, 1, 3, 1]
    assert len(tree_from_response(7, pb.RetrieveResponse())) == 1

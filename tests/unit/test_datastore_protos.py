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
    from specstore.client.datastore_client import tree_from_response
    from specstore.protos import datastore_pb2 as pb

    resp = pb.RetrieveResponse(tokens=[4, 5, 8], parents=[-1, 0, -1], probs=[0.9, 0.5, 0.1], sources=bytes([1, 3, 1]))
    wire = pb.RetrieveResponse.FromString(resp.SerializeToString())
    t = tree_from_response(7, wire)
    assert t.tokens.tolist() == [7, 4, 5, 8] and t.parents.tolist() == [-1, 0, 1, 0]
    assert np.allclose(t.probs, [1, 0.9, 0.5, 0.1]) and t.sources.tolist() == [0, 1, 3, 1]
    assert len(tree_from_response(7, pb.RetrieveResponse())) == 1
    # sources of the wrong length read as "datastore"; the tree's arrays are writable (fusion edits them)
    t = tree_from_response(7, pb.RetrieveResponse(tokens=[4, 5], parents=[-1, 0], probs=[1, 1], sources=b"\x01"))
    assert t.sources.tolist() == [0, 1, 1]
    t = tree_from_response(7, wire)
    t.sources[1] |= 4
    assert t.sources.tolist() == [0, 5, 3, 1]


def test_malformed_responses_are_rejected():
    import pytest

    from specstore.client.datastore_client import tree_from_response
    from specstore.protos import datastore_pb2 as pb

    for bad in (pb.RetrieveResponse(tokens=[4, 5], parents=[-1, 1], probs=[1, 1]),      # a node is its own parent
                pb.RetrieveResponse(tokens=[4, 5], parents=[-1, -2], probs=[1, 1]),     # below the root
                pb.RetrieveResponse(tokens=[4, 5], parents=[-1], probs=[1, 1])):        # lengths differ
        with pytest.raises(ValueError):
            tree_from_response(7, bad)


def test_client_source_bits_are_the_proto_enum():
    """The source bits are declared once, in the proto; the client's IntFlag carries the same names
    (without the enum's SOURCE_ prefix) and values, in the same order."""
    from specstore.client.types import Source
    from specstore.protos import datastore_pb2 as pb

    proto = [(v.name.removeprefix("SOURCE_"), v.number) for v in pb.DESCRIPTOR.enum_types_by_name["Source"].values]
    assert proto == [(name, int(member)) for name, member in Source.__members__.items()]

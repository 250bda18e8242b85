"""The wire format is written once: the committed stubs are what grpcio-tools makes of protos/inference.proto."""

import shutil
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from splitleak import protogen
from splitleak.protos import inference_pb2 as pb

# The repository's own protos/, found from this file: not wherever the package happens to be installed.
PROTOS = Path(__file__).resolve().parents[1] / "protos"


def stale_stubs(protos: Path, scratch: Path) -> list[str]:
    """The stubs committed in `protos` that differ from a fresh generation from its inference.proto."""
    fresh = protogen.generate(scratch, proto_dir=protos)
    assert sorted(f.name for f in fresh) == sorted(protogen.GENERATED)
    return [f.name for f in fresh if (protos / f.name).read_text() != f.read_text()]


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    assert stale_stubs(PROTOS, tmp_path) == [], f"stubs in {PROTOS} are stale: run `make protos` and commit them"


def test_a_stub_edited_by_hand_or_a_proto_changed_without_its_stubs_is_caught(tmp_path):
    copy = tmp_path / "protos"
    copy.mkdir()
    shutil.copy(PROTOS / "inference.proto", copy)
    protogen.generate(copy, proto_dir=copy)  # fresh stubs beside it, whatever state the committed ones are in
    stub = copy / "inference_pb2_grpc.py"
    fresh = stub.read_text()
    stub.write_text(fresh + "# edited by hand\n")
    assert stale_stubs(copy, tmp_path / "edited-stub") == ["inference_pb2_grpc.py"]

    stub.write_text(fresh)
    proto = copy / "inference.proto"
    message = "message ServerLiveRequest {"
    assert message in proto.read_text()
    proto.write_text(proto.read_text().replace(message, message + " string reason = 9;"))
    assert stale_stubs(copy, tmp_path / "edited-proto") == ["inference_pb2.py", "inference_pb2.pyi"]


def field_numbers(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_messages_use_the_open_inference_protocol_field_numbers():
    # From the published grpc_predict_v2.proto; a stock KServe or Triton peer decodes by these numbers.
    assert pb.DESCRIPTOR.package == "inference"
    assert field_numbers(pb.ModelInferRequest) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    assert field_numbers(pb.ModelInferRequest.InferInputTensor) == {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    }
    assert field_numbers(pb.ModelInferResponse) == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "outputs": 5,
        "raw_output_contents": 6,
    }
    assert field_numbers(pb.InferParameter) == {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    }
    assert field_numbers(pb.ModelStreamInferResponse) == {"error_message": 1, "infer_response": 2}
    assert field_numbers(pb.RepositoryIndexResponse.ModelIndex) == {"name": 1, "version": 2, "state": 3, "reason": 4}
    assert field_numbers(pb.ModelMetadataResponse) == {
        "name": 1,
        "versions": 2,
        "platform": 3,
        "inputs": 4,
        "outputs": 5,
    }
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
    assert methods == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "RepositoryIndex",
    ]


def test_the_proto_is_shipped_beside_its_stubs():
    # Under an editable install the package is protos/ itself, so looking beside pb.__file__ proves nothing: read
    # what a wheel takes instead.
    setuptools = tomllib.loads((PROTOS.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["splitleak.protos"] == PROTOS.name
    assert any(fnmatch("inference.proto", pattern) for pattern in setuptools["package-data"]["splitleak.protos"])

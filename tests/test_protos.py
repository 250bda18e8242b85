"""The wire format is written once: the committed stubs are what grpcio-tools makes of protos/inference.proto."""

from pathlib import Path

from splitleak import protogen
from splitleak.protos import inference_pb2 as pb


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    for fresh in protogen.generate(tmp_path):
        committed = protogen.PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run python -m splitleak.protogen"


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
    assert (Path(pb.__file__).parent / "inference.proto").exists()

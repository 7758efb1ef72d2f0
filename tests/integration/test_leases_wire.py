"""Optimization leases seen from a worker and from a plain gRPC client of a real bridge server."""

from __future__ import annotations

import grpc
import pytest

from dspex_dspy import Context, SessionContext, Variables
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.errors import BatchUpdateError, VariableLockedError
from dspex_dspy.leases import lease_request_options

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx() -> Context:
    ctx = Context()
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    Variables.defvariable(ctx, "model", "string", "a", constraints={"enum": ["a", "b"]})
    ctx.ensure_bridged()
    yield ctx
    ctx.stop()


def test_a_worker_sees_the_lease_in_listings_and_watches_and_is_refused(ctx: Context) -> None:
    assert ctx.bridge_address is not None
    with SessionContext.connect(ctx.bridge_address, session_id=ctx.id) as worker:
        watch = worker.watch_variables(["temperature"])
        first = next(watch)
        assert first.optimization_status is None
        lease = Variables.start_optimization(ctx, ["temperature", "model"], "tuner-1", ttl=60)
        listed = {v.name: v.optimization_status for v in worker.list_variables()}
        assert {name: s.optimizer_id if s else None for name, s in listed.items()} == {
            "temperature": "tuner-1",
            "model": "tuner-1",
        }
        with pytest.raises(VariableLockedError, match="held by optimizer tuner-1") as info:
            worker.set_variable("temperature", 0.1)
        assert info.value.optimizer_id == "tuner-1"
        with pytest.raises(BatchUpdateError) as batch:
            worker.set_variables({"temperature": 0.1, "model": "b"})
        assert all(isinstance(e, VariableLockedError) for e in batch.value.errors.values())
        with pytest.raises(VariableLockedError):
            worker.start_optimization(["model"], "tuner-2", ttl=60)

        # The holder's write, seen in the watch with the lease's status.
        Variables.update_many(ctx, {"temperature": 0.2, "model": "b"}, metadata={"optimizer_id": "tuner-1"})
        event = next(watch)
        assert (event.value, event.version) == (0.2, 2)
        assert event.optimization_status is not None and event.optimization_status.optimizer_id == "tuner-1"

        # A forced write from the worker goes through and is recorded.
        assert worker.set_variable("temperature", 1.5, metadata={"dspex.force": "true"}) == 3
        forced = Variables.get_variable(ctx, "temperature")
        assert forced.metadata["forced_over"] == "tuner-1"
        assert "dspex.force" not in forced.metadata

        Variables.stop_optimization(ctx, lease)
        assert worker.set_variable("temperature", 0.4) == 4
        own = worker.start_optimization(["model"], "worker-tuner", ttl=60)
        with pytest.raises(VariableLockedError, match="worker-tuner"):
            Variables.set(ctx, "model", "a")
        worker.stop_optimization(own)
        assert Variables.set(ctx, "model", "a") == 3
        watch.close()


def test_a_plain_grpc_client_gets_failed_precondition_and_the_lease_id(ctx: Context) -> None:
    assert ctx.bridge_address is not None
    with grpc.insecure_channel(ctx.bridge_address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        started = stub.StartOptimization(
            pb.StartOptimizationRequest(
                session_id=ctx.id,
                variable_identifier="temperature",
                optimizer_id="elixir-opt",
                optimizer_config=lease_request_options(["temperature", "model"], 60),
            )
        )
        assert started.success and started.optimization_id.startswith("opt_")
        with pytest.raises(grpc.RpcError) as info:
            stub.StartOptimization(
                pb.StartOptimizationRequest(session_id=ctx.id, variable_identifier="model", optimizer_id="other")
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "Variable locked: model is held by optimizer elixir-opt" in info.value.details()
        got = stub.GetVariable(pb.GetVariableRequest(session_id=ctx.id, variable_identifier="model"))
        assert got.variable.optimization_status.optimizing
        assert got.variable.optimization_status.optimizer_id == "elixir-opt"
        assert got.variable.optimization_status.started_at.seconds > 0
        with pytest.raises(grpc.RpcError) as refused:
            stub.StopOptimization(pb.StopOptimizationRequest(session_id=ctx.id, variable_identifier="model"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stopped = stub.StopOptimization(
            pb.StopOptimizationRequest(session_id=ctx.id, variable_identifier="model", force=True)
        )
        assert stopped.success and stopped.final_value.value == b'"a"'
        got = stub.GetVariable(pb.GetVariableRequest(session_id=ctx.id, variable_identifier="temperature"))
        assert not got.variable.HasField("optimization_status")
        with pytest.raises(grpc.RpcError) as bad:
            stub.StartOptimization(
                pb.StartOptimizationRequest(
                    session_id=ctx.id,
                    variable_identifier="model",
                    optimizer_id="x",
                    optimizer_config={"variables": "not json"},
                )
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

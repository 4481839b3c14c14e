"""FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated
Learning", ICML 2021, Alg. 1).

Like FedPer the body (representation φ) is shared and the head h_k personal, but
the client's update is two phases (Alg. 1 lines 5-8): first the head alone for
``head_epochs`` epochs with φ fixed (τ_h = 10 in the paper's experiments), then
the body alone for the configured local epochs (or ``train.steps``) with the
new head fixed. The reply is the body; the head stays in the client state.

General path: two optimizers over different parameter sets in sequence cannot
be one :class:`~fedtrust.fl.protocol.LocalTraining`, so ``client_update`` chains
two declarative phases on the reference trainer and ``local_training`` returns
``None`` (every executor then calls ``client_update``).
"""

from __future__ import annotations

from pydantic import Field

from fedtrust.algorithms.fedper import FedPer
from fedtrust.algorithms.personal import is_head, run_phase
from fedtrust.data.types import ImageSet
from fedtrust.fl.protocol import ClientContext, LocalTraining, Message, TrainResult
from fedtrust.registry import register


@register("algorithm", "fedrep")
class FedRep(FedPer):
    """Head epochs first (body frozen), then body epochs (head frozen); personal head."""

    name = "fedrep"

    class Params(FedPer.Params):
        head_epochs: int = Field(10, ge=1, description="epochs of head-only training before the body (τ_h of Alg. 1)")

    declarative = False

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining | None:
        return None

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        plan = self.plan(message, client_state, ctx)
        names = plan.trainable
        head = run_phase(plan, data, ctx, self.ctx.normalize, trainable=tuple(n for n in names if is_head(n)),
                         epochs=self.params.head_epochs, steps=None)
        body = run_phase(plan, data, ctx, self.ctx.normalize, init=head.state,
                         trainable=tuple(n for n in names if not is_head(n)))
        result = TrainResult(state=body.state, num_examples=body.num_examples, steps=head.steps + body.steps,
                             mean_loss=body.mean_loss)
        return self.finish(message, result, client_state, ctx)

"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020), as in NVFlare's ``PTScaffoldHelper`` / ``Scaffold`` workflow.

The server keeps a control variate c, each site its own c_k (both start at zero, one tensor
per trainable parameter). During local training, after every optimizer step with learning
rate lr, each parameter is corrected against client drift:

    w <- w - lr * (c - c_k)

After K steps from the global model x, the site updates its control variate (option II of
the paper) and sends the change with its weights:

    c_k+ = c_k - c + (x - w) / (K * lr),        delta_k = c_k+ - c_k

The server averages the weights as FedAvg does and moves its control variate by the mean
change, ``c <- c + (1 / N) sum_k delta_k`` (all N sites take part in every round, so the
paper's |S| / N factor is 1; NVFlare weighs the deltas by each site's step count instead).

Batch normalization: control variates exist only for trainable parameters. Running means and
variances are buffers: they are averaged as in FedAvg with no correction, and a site's local
statistics drift unchecked, a known pitfall on sites whose intensities differ. Combine with
care, or compare with FedBN, which keeps those statistics local.

The control variate reaches the sites in the global model's meta (``scaffold_c_global``) and
is not written into the server's checkpoint; a job resumed from a checkpoint restarts it at
zero, as at the first round.
"""

from fedharmony.methods.spec import MethodSpec

SPEC = MethodSpec(
    name="scaffold",
    summary="FedAvg + control variates against client drift (Karimireddy et al. 2020)",
    site="fedharmony.methods.scaffold.site.ScaffoldSite",
    recipe="fedharmony.methods.scaffold.server.ScaffoldRecipe",
    server_components=("fedharmony.methods.scaffold.server.ScaffoldAggregator",),
)

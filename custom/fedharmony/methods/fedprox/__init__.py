"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Local training minimizes ``loss(w) + mu / 2 * ||w - w_global||^2`` over the trainable
parameters, where ``w_global`` is the model the site received this round; the server is
FedAvg's. ``mu`` (default 0.01) is a setting of the job.
"""

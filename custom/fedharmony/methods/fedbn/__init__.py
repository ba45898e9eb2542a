"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization",
ICLR 2021): FedAvg in which every normalization layer (weights, biases and running statistics)
stays on its site; only the other layers are averaged. Each site's result is its own model."""

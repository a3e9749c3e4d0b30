"""CIFAR-10 training on Accelerate: config, data, models, engine, evaluation."""

"""CIFAR-10 and CIFAR-100 training on Accelerate: config, data, models, engine, evaluation; the commands
cifar-train, cifar-evaluate, cifar-predict, cifar-sweep, cifar-compare, cifar-export (cifar/*_cli.py, sweep, compare,
export) and the recipes they find by name (cifar/recipes/)."""

"""The application around the model: training, evaluation, prediction, checkpoints,
datasets, distributed set-up and the `maskrcnn` command. It may import every other
package of the project; nothing in the model, convert/ or deploy/ imports it."""

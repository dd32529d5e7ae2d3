"""Model parallelism for Keras 3 (TensorFlow backend) on Horovod process sets: tensor-parallel layers
and GPT, pipeline stages and the executor that runs GPipe/1F1B schedules (mirrors hvdllm.torch.parallel).

    grid = ProcessGrid(dp, tp, pp, world_size=N)
    hvd.init(process_sets=grid.process_sets())
    model = parallelize_gpt(GPT(cfg, seed), grid.group("tp", hvd.rank()))    # tensor parallel
    stage = GPTStage(model, grid.coords(hvd.rank()).pp, grid.pp)              # pipeline stage
    pipeline = PipelineExecutor(stage, grid, hvd.rank(), schedule="1f1b")
    loss, grads = pipeline.step(micro_inputs, micro_targets)                  # grads of stage.trainable_variables

Any Keras model splits the same way: :class:`Stage` wraps this rank's layers (see
:mod:`hvdllm.tensorflow.parallel.pipeline`).
"""
from hvdllm.core.grid import Group, ProcessGrid
from hvdllm.tensorflow.parallel.gpt import TensorParallelGPT, parallelize_gpt
from hvdllm.tensorflow.parallel.pipeline import GPTStage, PipelineExecutor, Stage, gpt_stage_bounds, split_layers
from hvdllm.tensorflow.parallel.shards import ShardLayout
from hvdllm.tensorflow.parallel.tensor import (ColumnParallelDense, RowParallelDense, VocabParallelEmbedding,
                                               copy_to_group, gather_from_group, reduce_from_group,
                                               scatter_to_group, vocab_parallel_cross_entropy)

__all__ = [
    "Group", "ProcessGrid", "TensorParallelGPT", "parallelize_gpt", "GPTStage", "PipelineExecutor", "Stage",
    "gpt_stage_bounds", "split_layers", "ShardLayout", "ColumnParallelDense", "RowParallelDense",
    "VocabParallelEmbedding", "vocab_parallel_cross_entropy", "copy_to_group", "reduce_from_group",
    "gather_from_group", "scatter_to_group",
]

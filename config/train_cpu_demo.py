# A CPU demo: a 3.4M-parameter model trained on 614,400 tokens of FineWeb, sized to finish in
# about five minutes on two cores (about 2,200 tokens/s in float32). Make the shards with
#   python prepare_fineweb.py --num_tokens 2e6 --val_tokens 262144 --out_dir data/fineweb_sample
# (add --input_dir DIR to read local FineWeb parquet files instead of downloading),
# then train with:
#   python train.py config/train_cpu_demo.py
# Most of the compute is in the 50304-row embedding, tied to lm_head, so a small hidden_size
# buys the most tokens per second.
data_dir = "data/fineweb_sample"
out_dir = "out-cpu-demo"
device = "cpu"
dtype = "float32"
compile = False  # a run this short would not repay torch.compile's start-up time

hidden_size = 64
intermediate_size = 192
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 16
max_position_embeddings = 256

sequence_length = 256
batch_size = 8
total_batch_size = 2048  # one micro-step of 8 x 256 tokens
max_steps = 300  # 614,400 training tokens

learning_rate = 3e-3  # a choice for this small model: 5x the rate of the 82M default
warmup_steps = 20
eval_interval = 50
val_tokens = 16384  # the first 16,384 of the 262,144 validation tokens, to keep each evaluation short
log_interval = 10

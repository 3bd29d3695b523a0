# The DGFN run of the experiment: the defaults of train.py with the DGFN feed-forward block
# (learned per-token gate, ReLU memory read-out), in its own out_dir.
#   python train.py config/train_fineweb_dgfn.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_dgfn.py
ffn = "dgfn"
dgfn_memory = "relu"
dgfn_gate = "dynamic"
out_dir = "out-fineweb-dgfn"

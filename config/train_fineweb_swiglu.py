# The SwiGLU baseline of the experiment: the defaults of train.py, in its own out_dir.
#   python train.py config/train_fineweb_swiglu.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_swiglu.py
ffn = "swiglu"
out_dir = "out-fineweb-swiglu"

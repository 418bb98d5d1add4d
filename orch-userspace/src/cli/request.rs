//! Which admin API request each client command stands for.

use std::net::SocketAddr;

use super::{BackendCommand, Command, NodeCommand, ServiceCommand};
use crate::{api::Request, model::AdminState};

/// The API request a client command stands for; `None` for the commands that are not
/// clients (`daemon`, `config`, `completions`, `man`).
pub fn request(command: &Command) -> Option<Request> {
    let r = match command {
        Command::Status => Request::Status,
        Command::Service { command } => match command {
            ServiceCommand::Add {
                name,
                vip,
                protocol,
                backends,
                check,
                scheduler,
            } => Request::ServiceAdd {
                name: name.clone(),
                vip: vip.ip(),
                port: vip.port(),
                protocol: *protocol,
                backends: backends.clone(),
                check: check.clone(),
                scheduler: *scheduler,
            },
            ServiceCommand::Rm { name } => Request::ServiceRm { name: name.clone() },
            ServiceCommand::List => Request::ServiceList,
            ServiceCommand::Show { name } => Request::ServiceShow { name: name.clone() },
        },
        Command::Backend { command } => {
            let state = |service: &String, address: &SocketAddr, state| Request::BackendSetState {
                service: service.clone(),
                address: *address,
                state,
            };
            match command {
                BackendCommand::Add {
                    service,
                    address,
                    weight,
                } => Request::BackendAdd {
                    service: service.clone(),
                    address: *address,
                    weight: *weight,
                },
                BackendCommand::Rm { service, address } => Request::BackendRm {
                    service: service.clone(),
                    address: *address,
                },
                BackendCommand::Drain {
                    service, address, ..
                } => state(service, address, AdminState::Draining),
                BackendCommand::Enable { service, address } => {
                    state(service, address, AdminState::Active)
                }
                BackendCommand::Disable { service, address } => {
                    state(service, address, AdminState::Disabled)
                }
                BackendCommand::List { service } => Request::BackendList {
                    service: service.clone(),
                },
            }
        }
        Command::Explain {
            protocol,
            client,
            vip,
        } => Request::Explain {
            protocol: *protocol,
            client: *client,
            vip: *vip,
        },
        Command::Node {
            command: NodeCommand::List,
        } => Request::NodeList,
        Command::Daemon { .. }
        | Command::Config { .. }
        | Command::Completions { .. }
        | Command::Man => return None,
    };
    Some(r)
}
